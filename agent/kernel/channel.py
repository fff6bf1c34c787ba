"""One kernel protocol over one endpoint (agent/kernel/transport.py): register,
read a request, reply."""

from __future__ import annotations

import select

from agent.kernel import linux_wire
from agent.kernel.messages import KernelProtocolError, KernelRequest
from agent.kernel.protocol import KernelProtocol
from agent.kernel.transport import POLL_EVENTS, Endpoint, KernelLost


class KernelChannel:
    """One protocol over one endpoint: register, read a request, reply."""

    def __init__(self, endpoint: Endpoint, protocol: KernelProtocol) -> None:
        self.endpoint = endpoint
        self.protocol = protocol
        self.poll_mask = POLL_EVENTS

    def fileno(self) -> int:
        return self.endpoint.fileno()

    def register(self, timeout: float = 5.0) -> int | None:
        """Linux handshake (VSS_OP_REGISTER1 -> 4-byte answer); FreeBSD has none."""
        if not self.protocol.handshake:
            return None
        self._write(linux_wire.encode_register())
        poller = select.poll()
        poller.register(self.fileno(), self.poll_mask)
        if not poller.poll(int(timeout * 1000)):
            raise KernelLost("no answer to registration")
        return linux_wire.decode_register_answer(self._read())

    def read_request(self) -> KernelRequest | None:
        return self.protocol.decode_request(self._read())

    def reply(self, req: KernelRequest, ok: bool) -> None:
        self._write(self.protocol.encode_reply(req, ok))

    def _read(self) -> bytes:
        try:
            data = self.endpoint.read()
        except OSError as e:
            raise KernelLost(f"read failed: {e.strerror}") from None
        if not data:
            raise KernelLost("the device was closed")
        return data

    def _write(self, frame: bytes) -> None:
        try:
            self.endpoint.write(frame)
        except OSError as e:
            raise KernelLost(f"write failed: {e.strerror}") from None

    def close(self) -> None:
        try:
            self.endpoint.close()
        except OSError:
            pass


__all__ = ["KernelChannel", "KernelLost", "KernelProtocolError"]
