"""The command line: `python -m agent`, or this file run by `python -I -S` (the daemon).

Run as root, the daemon must not run code that someone else could have put on
its path: so its interpreter starts with -I (no PYTHON* variables, no user
site, no script directory on sys.path) and -S (site.py does not run, so no
.pth file in site-packages runs code as root, and site-packages is not on
sys.path).  This file is then run by its path: it loads the packages agent
and privileged from the directory that holds it (the one the install check
verifies), leaving sys.path to the standard library, as the root child does
(agent/engine/child_link.py).  Site-packages is reached only after the
privilege drop, without its .pth files (agent/engine/root.py).
"""

import sys

if __package__ in (None, ""):  # run by path, not as `-m agent`
    import _frozen_importlib as _boot
    import _frozen_importlib_external as _ext
    import os

    _top = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    for _name in ("privileged", "agent"):  # privileged imports nothing of agent
        _spec = _ext.PathFinder.find_spec(_name, [_top])
        if _spec is None or _spec.loader is None:
            sys.exit(f"hv-vss-agent: no {_name} package in {_top}")
        sys.modules[_name] = _module = _boot.module_from_spec(_spec)
        _spec.loader.exec_module(_module)

from agent.cli import main

raise SystemExit(main())
