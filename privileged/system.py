"""Which system this is, asked once, at import: the child's one platform test.

Every module of privileged/ that differs by system reads LINUX from here (the child chooses
its freezer, mount table and sandbox by it, hardening its calls, device its way of opening).
The FreeBSD count of tools/root_loc.py sets sys.platform before privileged/ is loaded.
"""

import sys

LINUX = sys.platform.startswith("linux")
