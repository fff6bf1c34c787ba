"""The Hyper-V host's side of the VSS integration component, common to both driver models.

The host speaks the same VMBus IC messages to a Linux and a FreeBSD guest: the
operations of `enum hv_vss_op` (CREATE=0 .. AUTO_RECOVER=7, identical in
Linux's include/uapi/linux/hyperv.h and FreeBSD's hv_snapshot.c) and HRESULT
statuses (hv_utilreg.h).  Linux's daemon wire carries those numbers unchanged,
so they are declared once, in agent.kernel.linux_wire.  A HostRequest is one
message the host sent and, once the guest's kernel answered, what it received.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.kernel.linux_wire import (
    HV_E_FAIL,
    HV_S_OK,
    VSS_OP_AUTO_RECOVER,
    VSS_OP_BU_COMPLETE,
    VSS_OP_CREATE,
    VSS_OP_DELETE,
    VSS_OP_FREEZE,
    VSS_OP_GET_DM_INFO,
    VSS_OP_HOT_BACKUP,
    VSS_OP_THAW,
)

# Body flags of every reply to HOT_BACKUP (hv_snapshot.c on both systems).
VSS_HBU_NO_AUTO_RECOVERY = 5

#: What the host simulator's send("check" | "freeze" | "thaw") means.
OPS = {"check": VSS_OP_HOT_BACKUP, "freeze": VSS_OP_FREEZE, "thaw": VSS_OP_THAW}


__all__ = [
    "HV_E_FAIL", "HV_S_OK", "OPS", "VSS_HBU_NO_AUTO_RECOVERY", "VSS_OP_AUTO_RECOVER",
    "VSS_OP_BU_COMPLETE", "VSS_OP_CREATE", "VSS_OP_DELETE", "VSS_OP_FREEZE",
    "VSS_OP_GET_DM_INFO", "VSS_OP_HOT_BACKUP", "VSS_OP_THAW", "HostRequest",
]


@dataclass
class HostRequest:
    op: int
    id: int
    sent_at: float
    status: int | None = None  # what the host received
    flags: int = 0
    answered_by: str = ""  # "daemon", "kernel", "timeout", "reset"
    daemon_reply: bytes | None = None  # the exact bytes the daemon wrote
    answered_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def latency(self) -> float:
        return (self.answered_at or self.sent_at) - self.sent_at
