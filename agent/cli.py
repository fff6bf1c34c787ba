"""hv-vss-agent command line.

The daemon keeps the stock hv_vss_daemon's flags, as its code has them (its
man page swaps them): -n stay in the foreground (log to stderr), -d debug
output, -h usage.  Subcommands come first on the line when used: the
clients `status` (asks the running agent) and `hook` (runs qemu-ga-style
hooks as a subscriber), and `simulator` (a simulated host to try it on).
Every bad input is one line on stderr and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from agent import __version__, config, platforms
from agent.engine.privdrop import DropError
from agent.errors import StartupError
from privileged.config import ConfigError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (try -h)\n")
        raise SystemExit(EXIT_USAGE)


def daemon_parser() -> Parser:
    p = Parser(prog="hv-vss-agent", description="Privilege-separated Hyper-V VSS guest agent.",
               epilog="Clients: `hv-vss-agent status -h`, `hv-vss-agent hook -h`; a "
                      "simulated host to try it on: `hv-vss-agent simulator -h`. "
                      "See hv-vss-agent(8).")
    p.add_argument("--version", action="version", version=f"hv-vss-agent {__version__}")
    p.add_argument("-n", dest="foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-d", dest="debug", action="store_true", help="debug output")
    p.add_argument("--config", metavar="PATH",
                   help=f"configuration file (default {platforms.CONFIG_PATH}, "
                        "if it exists)")
    p.add_argument("--device", metavar="PATH",
                   help="kernel device, or a simulator's Unix socket")
    p.add_argument("--protocol", choices=("linux", "freebsd"),
                   help="kernel protocol (default: this system's)")
    p.add_argument("--simulator-may-freeze-all", action="store_true",
                   help="serve a simulator (a Unix socket as the device) even though the "
                        "config has no [freeze] only: every filesystem, / included, is frozen")
    p.add_argument("--simulate", action="store_true",
                   help="demo: run the agent against the built-in host simulator on scratch "
                        "filesystems it creates and removes")
    p.add_argument("--cycles", type=int, metavar="N",
                   help="with --simulate: CHECK/FREEZE/THAW cycles to run (default 3)")
    p.add_argument("--hold", type=float, metavar="SECONDS",
                   help="with --simulate: how long the host keeps the filesystems frozen "
                        "(default 1)")
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # demo, not root
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] in ("status", "hook", "simulator"):
        _with_site_packages()
    if args_list and args_list[0] in ("status", "hook"):
        from agent.clients.cli import client_main

        return client_main(args_list)
    if args_list and args_list[0] == "simulator":
        from agent.simulator import command

        return command.main(args_list[1:])
    parser = daemon_parser()
    args = parser.parse_args(args_list)
    given = [o for o, v in (("--cycles", args.cycles), ("--hold", args.hold)) if v is not None]
    if given and not args.simulate:
        parser.error(f"{given[0]} is for --simulate")
    args.cycles = 3 if args.cycles is None else args.cycles
    args.hold = 1.0 if args.hold is None else args.hold
    if args.cycles < 1 or not args.hold > 0:  # `not > 0`: nan as well
        parser.error("--cycles must be at least 1 and --hold positive")
    try:
        if args.simulate:
            _with_site_packages()
            from agent.dev import demo

            return demo.run(args)
        cfg = config.load(args.config)
        if args.device:
            cfg = _replace(cfg, device=args.device)
        if args.protocol:
            cfg = _replace(cfg, protocol=args.protocol)
        from agent.engine import root

        return root.run(cfg, args.foreground, args.debug, args.in_memory,
                          simulator_may_freeze_all=args.simulator_may_freeze_all)
    except (ConfigError, StartupError, DropError) as e:
        sys.stderr.write(f"hv-vss-agent: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _with_site_packages() -> None:
    """Started by the launcher (-S), the clients and the demo still need site-packages
    (psutil); the daemon adds it itself once unprivileged (agent/engine/root.py)."""
    from agent.engine.integrity import site_packages

    sys.path.extend(p for p in site_packages() if p not in sys.path)


def _replace(cfg: config.AgentConfig, **changes: object) -> config.AgentConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
