"""FreeBSD /dev/hv_fsvss_dev messages (sys/dev/hyperv/utilities/hv_snapshot.h), no I/O.

struct hv_vss_opt_msg, 64 bytes, no padding: u32 opt, u32 status, u64 msgid,
u8 reserved[48].  IOCHVVSSREAD fills it; status != 0 means nothing was pending
(the request timed out between poll and read).  The answer, through
IOCHVVSSWRITE, must echo opt and msgid exactly (the kernel matches on msgid
and KASSERTs opt), with status 0 or 1 and the reserved bytes zero.
"""

from __future__ import annotations

import struct

from agent.kernel.messages import KernelProtocolError, KernelRequest
from agent.protocols.verb import Verb

MSG = struct.Struct("<IIQ48s")
MSG_SIZE = MSG.size  # 64

HV_VSS_NONE = 0
HV_VSS_CHECK = 1
HV_VSS_FREEZE = 2
HV_VSS_THAW = 3

VSS_SUCCESS = 0
VSS_FAIL = 1

# _IOR('v', 2, struct hv_vss_opt_msg) and _IOW('v', 3, ...), per sys/sys/ioccom.h
IOCHVVSSREAD = 0x40407602
IOCHVVSSWRITE = 0x80407603

_OPS = {HV_VSS_CHECK: Verb.CHECK, HV_VSS_FREEZE: Verb.FREEZE, HV_VSS_THAW: Verb.THAW}


def decode_request(frame: bytes) -> KernelRequest | None:
    """The request read, or None when the kernel had nothing pending."""
    if len(frame) != MSG_SIZE:
        raise KernelProtocolError(f"message of {len(frame)} bytes, expected {MSG_SIZE}")
    opt, status, msgid, _ = MSG.unpack(frame)
    if status != VSS_SUCCESS:
        return None
    return KernelRequest(_OPS.get(opt), opt, bytes(frame), msgid)


def encode_reply(req: KernelRequest, ok: bool) -> bytes:
    return MSG.pack(req.code, VSS_SUCCESS if ok else VSS_FAIL, req.msgid, bytes(48))
