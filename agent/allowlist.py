"""Who may talk to us: names from the config, resolved once, as root, before the chroot.

Root needs the numbers to give the listening sockets their group and ACL
(agent/engine/listeners.py); the frontend checks every peer against them
(agent/peercred.py says who the peer is).
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from agent.errors import StartupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agent.peercred import PeerCred


@dataclass(frozen=True)
class Allowlist:
    """Root, plus the configured users and members of the configured groups."""

    uids: frozenset[int]
    gids: frozenset[int]

    def allows(self, cred: PeerCred) -> bool:
        return cred.uid == 0 or cred.uid in self.uids or bool(cred.groups & self.gids)

    @classmethod
    def from_names(cls, users: Iterable[str], groups: Iterable[str], what: str) -> Allowlist:
        """Resolved once, as root before the chroot: /etc is not there afterwards."""
        return cls(frozenset(user_id(u, what) for u in users),
                   frozenset(group_id(g, what) for g in groups))


def user_id(name: str, what: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise StartupError(f"{what}: no such user {name!r}") from None


def group_id(name: str, what: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(f"{what}: no such group {name!r}") from None
