"""Whether the kernel device opened: all of the kernel protocol that root runs.

Root opens the device (privileged/device.py) and must know, before it starts
the child, whether the open succeeded: a busy device (a second daemon) is
refused then, or the child's crash recovery could thaw the other daemon's
freeze.  A device node says so in open(2) itself.  The simulator's socket
says so in the first record of every connection, open(2)'s errno as 4 bytes
(0 = opened), which check_opened() turns into the OSError the device's open()
would have raised.  Everything else, agent/kernel/transport.py, runs
unprivileged.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import struct

OPEN_STATUS = struct.Struct("<i")
OPEN_WAIT = 5.0  # seconds for the simulator to say


def check_opened(fd: int, timeout: float = OPEN_WAIT) -> None:
    """Raise, having closed `fd`, if the simulator behind it says the open failed."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise OSError(errno.ETIMEDOUT, "the simulator did not answer the open")
        data = os.read(fd, 256)  # more than the record: a longer one shows as too long
        if len(data) != OPEN_STATUS.size:
            raise OSError(errno.EIO, "the simulator closed the connection")
        (err,) = OPEN_STATUS.unpack(data)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        os.close(fd)
        raise
