"""Linux /dev/vmbus/hv_vss messages (include/uapi/linux/hyperv.h), no I/O.

struct hv_vss_msg is packed, 12 bytes: a union of {u8 operation; u8
reserved[7]} with {int error} (bytes 0..7), then a u32 flags union (8..11).
The reply's 32-bit status overlays the operation byte, so a reply is built as
the real daemon builds it: the request's bytes, with the first four replaced
by the status.

Registration: write a message whose operation is VSS_OP_REGISTER1 (129); the
kernel answers with a 4-byte u32 (its own VSS_OP_REGISTER1), which the stock
daemon only logs as "kernel_modver".
"""

from __future__ import annotations

import struct

from agent.kernel.messages import KernelProtocolError, KernelRequest
from agent.protocols.verb import Verb

MSG_SIZE = 12
REGISTER_ANSWER_SIZE = 4

VSS_OP_CREATE = 0
VSS_OP_DELETE = 1
VSS_OP_HOT_BACKUP = 2
VSS_OP_GET_DM_INFO = 3
VSS_OP_BU_COMPLETE = 4
VSS_OP_FREEZE = 5
VSS_OP_THAW = 6
VSS_OP_AUTO_RECOVER = 7
VSS_OP_REGISTER = 128
VSS_OP_REGISTER1 = 129

HV_S_OK = 0x00000000
HV_E_FAIL = 0x80004005

_OPS = {VSS_OP_HOT_BACKUP: Verb.CHECK, VSS_OP_FREEZE: Verb.FREEZE, VSS_OP_THAW: Verb.THAW}


def encode_register() -> bytes:
    return struct.pack("<B7xI", VSS_OP_REGISTER1, 0)


def decode_register_answer(data: bytes) -> int:
    if len(data) != REGISTER_ANSWER_SIZE:
        raise KernelProtocolError(
            f"registration answer of {len(data)} bytes, expected {REGISTER_ANSWER_SIZE}")
    (modver,) = struct.unpack("<I", data)
    return int(modver)


def decode_request(frame: bytes) -> KernelRequest:
    if len(frame) != MSG_SIZE:
        raise KernelProtocolError(f"message of {len(frame)} bytes, expected {MSG_SIZE}")
    op = frame[0]
    return KernelRequest(_OPS.get(op), op, bytes(frame))


def encode_reply(req: KernelRequest, ok: bool) -> bytes:
    return struct.pack("<I", HV_S_OK if ok else HV_E_FAIL) + req.raw[4:MSG_SIZE]
