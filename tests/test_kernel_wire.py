"""Kernel message codecs: golden bytes, as the reference documents the drivers.

Each case is fed whole, and checked against the layout from the uapi header
(Linux) and hv_snapshot.h (FreeBSD).
"""

from __future__ import annotations

import re
import struct
import time

import pytest

from agent.kernel import freebsd_wire as fw
from agent.kernel import linux_wire as lw
from agent.kernel.messages import KernelProtocolError, KernelRequest
from agent.kernel.protocol import FREEBSD, LINUX
from agent.protocols.verb import Verb

# --- Linux: struct hv_vss_msg, packed, 12 bytes ---------------------------------------


def test_linux_constants_match_the_uapi_header():
    assert (lw.VSS_OP_HOT_BACKUP, lw.VSS_OP_FREEZE, lw.VSS_OP_THAW) == (2, 5, 6)
    assert (lw.VSS_OP_REGISTER, lw.VSS_OP_REGISTER1) == (128, 129)
    assert (lw.HV_S_OK, lw.HV_E_FAIL) == (0, 0x80004005)
    assert lw.MSG_SIZE == 12


HYPERV_H = "/usr/include/linux/hyperv.h"  # linux-libc-dev (make deps installs it)


def uapi_vss_numbers() -> dict[str, int]:
    """enum hv_vss_op (its implicit values counted) and the #defines next to it."""
    with open(HYPERV_H, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    body = re.search(r"enum hv_vss_op \{(.*?)\};", text, re.DOTALL)
    assert body, f"no enum hv_vss_op in {HYPERV_H}"
    out, value = {}, -1
    for item in (i.strip() for i in body.group(1).split(",")):
        if not item:
            continue
        name, _, given = (x.strip() for x in item.partition("="))
        value = int(given, 0) if given else value + 1
        out[name] = value
    for name, number in re.findall(r"#define\s+(VSS_OP_REGISTER1?|HV_S_OK|HV_E_FAIL)\s+(\w+)",
                                   text):
        out[name] = int(number, 0)
    return out


def test_every_linux_number_is_the_uapi_header_s():
    header = uapi_vss_numbers()
    ours = {n: getattr(lw, n) for n in dir(lw) if n.startswith(("VSS_OP_", "HV_S_", "HV_E_"))}
    assert len(ours) == 12
    assert {n: header[n] for n in ours} == ours


def test_linux_register_message_golden_bytes():
    assert lw.encode_register() == bytes([129]) + bytes(11)


def test_linux_register_answer_is_exactly_four_bytes():
    assert lw.decode_register_answer(struct.pack("<I", 129)) == 129
    for bad in (b"", b"\x81\x00\x00", bytes(5), bytes(12)):
        with pytest.raises(KernelProtocolError):
            lw.decode_register_answer(bad)


@pytest.mark.parametrize(("code", "op"), [
    (2, Verb.CHECK), (5, Verb.FREEZE), (6, Verb.THAW),
    (0, None), (3, None), (7, None), (200, None),
])
def test_linux_request_decoding(code, op):
    frame = bytes([code]) + bytes(11)
    req = lw.decode_request(frame)
    assert (req.op, req.code, req.raw) == (op, code, frame)


@pytest.mark.parametrize("length", [0, 4, 11, 13, 64])
def test_linux_request_of_the_wrong_size_is_rejected(length):
    with pytest.raises(KernelProtocolError):
        lw.decode_request(bytes([5]) + bytes(max(0, length - 1)))


def test_linux_reply_overlays_the_status_on_the_request():
    """The 32-bit status replaces bytes 0..3 (operation + 3 reserved); 4..11 are echoed."""
    req = lw.decode_request(bytes([5, 1, 2, 3, 4, 5, 6, 7]) + struct.pack("<I", 0xAABBCCDD))
    assert lw.encode_reply(req, True) == bytes(4) + bytes([4, 5, 6, 7]) + struct.pack(
        "<I", 0xAABBCCDD)
    assert lw.encode_reply(req, False) == bytes([0x05, 0x40, 0x00, 0x80, 4, 5, 6, 7]) + \
        struct.pack("<I", 0xAABBCCDD)


# --- FreeBSD: struct hv_vss_opt_msg, 64 bytes -------------------------------------------


def test_freebsd_constants_match_the_header_and_ioccom():
    assert fw.MSG_SIZE == 64
    assert (fw.HV_VSS_CHECK, fw.HV_VSS_FREEZE, fw.HV_VSS_THAW) == (1, 2, 3)
    # _IOR('v', 2, 64 bytes) and _IOW('v', 3, 64 bytes), per sys/sys/ioccom.h
    assert fw.IOCHVVSSREAD == 0x40000000 | (64 << 16) | (ord("v") << 8) | 2
    assert fw.IOCHVVSSWRITE == 0x80000000 | (64 << 16) | (ord("v") << 8) | 3


def test_freebsd_request_and_reply_golden_bytes():
    msgid = 1_732_550_000_123_456_789
    frame = struct.pack("<IIQ", 2, 0, msgid) + bytes(48)
    req = fw.decode_request(frame)
    assert req is not None
    assert (req.op, req.code, req.msgid) == (Verb.FREEZE, 2, msgid)
    assert fw.encode_reply(req, True) == struct.pack("<IIQ", 2, 0, msgid) + bytes(48)
    assert fw.encode_reply(req, False) == struct.pack("<IIQ", 2, 1, msgid) + bytes(48)


def test_freebsd_reply_zeroes_reserved_bytes_whatever_the_request_carried():
    frame = struct.pack("<IIQ", 1, 0, 5) + b"\xff" * 48
    req = fw.decode_request(frame)
    assert req is not None
    assert fw.encode_reply(req, True)[16:] == bytes(48)


def test_freebsd_read_with_nothing_pending_is_none():
    assert fw.decode_request(struct.pack("<IIQ", 0, 1, 0) + bytes(48)) is None


def test_freebsd_unknown_opt_is_other():
    req = fw.decode_request(struct.pack("<IIQ", 9, 0, 1) + bytes(48))
    assert req is not None and req.op is None


@pytest.mark.parametrize("length", [0, 12, 63, 65])
def test_freebsd_wrong_size_is_rejected(length):
    with pytest.raises(KernelProtocolError):
        fw.decode_request(bytes(length))


def test_the_kernel_s_deadline_counts_from_when_the_request_was_made():
    """FreeBSD's msgid is nanotime() when the host's request was made: a request 10 s old
    under a 15 s chain timeout leaves 5 s.  Linux's requests say nothing (no deadline)."""
    made = int((time.time() - 10.0) * 1e9)
    old = KernelRequest(Verb.FREEZE, fw.HV_VSS_FREEZE, bytes(fw.MSG_SIZE), made)
    assert FREEBSD.deadline(old, 100.0, 15.0) == pytest.approx(105.0, abs=0.5)
    assert LINUX.deadline(lw.decode_request(bytes([lw.VSS_OP_FREEZE]) + bytes(11)), 100.0,
                          15.0) is None
