"""hv-vss-agent command line.

The daemon keeps the stock hv_vss_daemon's flags, as its code has them (its
man page swaps them): -n stay in the foreground (log to stderr), -d debug
output, -h usage.  Every bad input is one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from agent import config
from agent.errors import StartupError
from agent.privdrop import DropError
from privileged.config import ConfigError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (try -h)\n")
        raise SystemExit(EXIT_USAGE)


def daemon_parser() -> Parser:
    p = Parser(prog="hv-vss-agent", description="Privilege-separated Hyper-V VSS guest agent.",
               epilog="See hv-vss-agent(8).")
    p.add_argument("-n", dest="foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-d", dest="debug", action="store_true", help="debug output")
    p.add_argument("--config", metavar="PATH",
                   help=f"configuration file (default {config.default_config_path()}, "
                        "if it exists)")
    p.add_argument("--device", metavar="PATH",
                   help="kernel device, or a simulator's Unix socket")
    p.add_argument("--protocol", choices=("linux", "freebsd"),
                   help="kernel protocol (default: this system's)")
    p.add_argument("--simulate", action="store_true",
                   help="demo: run the agent against the built-in host simulator on scratch "
                        "filesystems it creates and removes")
    p.add_argument("--cycles", type=int, default=3, metavar="N",
                   help="with --simulate: CHECK/FREEZE/THAW cycles to run (default 3)")
    p.add_argument("--hold", type=float, default=1.0, metavar="SECONDS",
                   help="with --simulate: how long the host keeps the filesystems frozen")
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # demo, not root
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args = daemon_parser().parse_args(args_list)
    try:
        if args.simulate:
            from agent import demo

            return demo.run(args)
        cfg = config.load(args.config)
        if args.device:
            cfg = _replace(cfg, device=args.device)
        if args.protocol:
            cfg = _replace(cfg, protocol=args.protocol)
        from agent import daemon

        return daemon.run(cfg, args.foreground, args.debug, args.in_memory)
    except (ConfigError, StartupError, DropError) as e:
        sys.stderr.write(f"hv-vss-agent: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _replace(cfg: config.AgentConfig, **changes: object) -> config.AgentConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
