"""The [metrics] directory, opened by root before the drop (agent/engine/metrics.py says
what holding that descriptor means)."""

from __future__ import annotations

import os
import stat

from agent.errors import StartupError


def open_metrics_dir(path: str) -> int:
    """Root, before the drop: the directory, as a descriptor (checked by check_metrics_dir)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StartupError(f"[metrics] dir {path}: {e.strerror}") from None


def check_metrics_dir(fd: int, path: str, uid: int | None, gid: int | None,
                      frozen_devices: dict[int, str]) -> None:
    """Not on a filesystem the child freezes (a write there could block while frozen),
    and writable by the account."""
    st = os.fstat(fd)
    if st.st_dev in frozen_devices:
        raise StartupError(f"[metrics] dir {path} is on {frozen_devices[st.st_dev]}, which the "
                           "agent freezes: choose a directory on a filesystem it does not "
                           "freeze, such as one under /run")
    if uid is not None and not _writable_by(st, uid, gid):
        raise StartupError(f"[metrics] dir {path} is not writable by uid {uid}: "
                           f"chown {uid} {path}")


def _writable_by(st: os.stat_result, uid: int, gid: int | None) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if gid is not None and st.st_gid == gid:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)
