"""The two kernel VSS protocols, each one object, chosen once from `[device] protocol`
after the drop: how its requests decode and its replies encode, its handshake, when the
kernel stops waiting for an answer, and what an operation the agent does not know is
answered.  The root phase only opens the device (agent/kernel/transport.py), with the
protocol's name: so root never loads these codecs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.kernel import freebsd_wire, linux_wire
from agent.kernel.messages import KernelRequest


@dataclass(frozen=True)
class KernelProtocol:
    name: str  # as [device] protocol spells it
    decode_request: Callable[[bytes], KernelRequest | None]  # None: nothing to do
    encode_reply: Callable[[KernelRequest, bool], bytes]
    handshake: bool  # Linux: VSS_OP_REGISTER1, then a 4-byte answer; FreeBSD's open registers
    unknown_ok: bool  # the stock daemon's answer to an unknown operation: Linux's success

    def deadline(self, req: KernelRequest, now: float, kernel_timeout: float) -> float | None:
        """When the kernel stops waiting (monotonic), if the request says: FreeBSD's msgid
        is nanotime() when the request was made (hv_vss_init_req), and one callout of
        kernel_timeout covers the whole chain from then.  Linux's requests carry none."""
        if not req.msgid:
            return None
        return now + kernel_timeout - (time.time() - req.msgid / 1e9)


LINUX = KernelProtocol("linux", linux_wire.decode_request, linux_wire.encode_reply,
                       handshake=True, unknown_ok=True)
FREEBSD = KernelProtocol("freebsd", freebsd_wire.decode_request, freebsd_wire.encode_reply,
                         handshake=False, unknown_ok=False)
PROTOCOLS = {p.name: p for p in (LINUX, FREEBSD)}
