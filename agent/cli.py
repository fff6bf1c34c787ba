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

from agent import __version__, config
from agent.engine.privdrop import DropError
from agent.errors import StartupError
from privileged.config import ConfigError

EXIT_USAGE = 2
# Not in the state directory (/run/hv-vss-agent, root's alone): clients must pass through.
DEFAULT_NOTIFY_SOCKET = "/run/hv-vss-agent-sockets/notify.sock"
DEFAULT_CONTROL_SOCKET = "/run/hv-vss-agent-sockets/control.sock"


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
                   help=f"configuration file (default {config.default_config_path()}, "
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
    p.add_argument("--cycles", type=int, default=3, metavar="N",
                   help="with --simulate: CHECK/FREEZE/THAW cycles to run (default 3)")
    p.add_argument("--hold", type=float, default=1.0, metavar="SECONDS",
                   help="with --simulate: how long the host keeps the filesystems frozen")
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # demo, not root
    return p


def status_parser() -> Parser:
    p = Parser(prog="hv-vss-agent status",
               description="What the running agent is doing, and what it did lately.")
    p.add_argument("--json", action="store_true", help="the whole answer, as JSON")
    p.add_argument("--watch", nargs="?", type=_seconds, const=1.0, metavar="SECONDS",
                   help="ask again every SECONDS (default 1) until interrupted; with --json, "
                        "one JSON object per line")
    p.add_argument("--socket", metavar="PATH", help="the control socket (default: [control] "
                   f"socket of the config file, else {DEFAULT_CONTROL_SOCKET})")
    p.add_argument("--config", metavar="PATH", help="configuration file to take the path from")
    return p


def hook_parser() -> Parser:
    p = Parser(prog="hv-vss-agent hook",
               description="Subscribe and run qemu-ga-style fsfreeze hooks: PATH freeze before "
                           "the freeze, PATH thaw after the thaw.")
    p.add_argument("--exec", required=True, metavar="PATH",
                   help="the hook, or a directory of hooks (like fsfreeze-hook.d)")
    p.add_argument("--socket", metavar="PATH", help="the subscriber socket (default: [notify] "
                   f"socket of the config file, else {DEFAULT_NOTIFY_SOCKET})")
    p.add_argument("--config", metavar="PATH", help="configuration file to take the path from")
    p.add_argument("--name", metavar="NAME", help="how the agent's log and status name us "
                   "(default hook-<basename of PATH>)")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="at most this long for the freeze hooks together, and for each "
                        "thaw hook (the agent may allow less)")
    p.add_argument("--wait", action="store_true",
                   help="if the agent is not running yet, wait for it instead of failing")
    p.add_argument("-d", dest="debug", action="store_true", help="debug output")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.1 and 3600 seconds")
    return value


def client_socket(explicit: str | None, config_path: str | None, section: str,
                  default: str) -> str:
    """--socket, else the config file's (if we may read it), else the default."""
    if explicit:
        return explicit
    try:
        cfg = config.load(config_path)
    except ConfigError:
        if config_path:
            raise
        return default  # the config is root's and 0600: an unprivileged client cannot read it
    chosen = cfg.notify.socket if section == "notify" else cfg.control.socket
    return chosen or default


def client_main(argv: list[str]) -> int:
    try:
        if argv[0] == "status":
            from agent.clients import status as status_client
            from agent.protocols.control import ControlError

            args = status_parser().parse_args(argv[1:])
            path = client_socket(args.socket, args.config, "control", DEFAULT_CONTROL_SOCKET)
            if args.watch is not None:
                return status_client.watch(path, args.json, args.watch)
            try:
                return status_client.run(path, args.json)
            except ControlError as e:
                sys.stderr.write(f"hv-vss-agent status: {e}\n")
                return status_client.exit_code(e)
        from agent.clients import hook

        args = hook_parser().parse_args(argv[1:])
        path = client_socket(args.socket, args.config, "notify", DEFAULT_NOTIFY_SOCKET)
        return hook.run(args, path)
    except ConfigError as e:
        sys.stderr.write(f"hv-vss-agent {argv[0]}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] in ("status", "hook"):
        return client_main(args_list)
    if args_list and args_list[0] == "simulator":
        from agent.simulator import command

        return command.main(args_list[1:])
    args = daemon_parser().parse_args(args_list)
    try:
        if args.simulate:
            from agent.dev import demo

            return demo.run(args)
        cfg = config.load(args.config)
        if args.device:
            cfg = _replace(cfg, device=args.device)
        if args.protocol:
            cfg = _replace(cfg, protocol=args.protocol)
        from agent.engine import daemon

        return daemon.run(cfg, args.foreground, args.debug, args.in_memory,
                          simulator_may_freeze_all=args.simulator_may_freeze_all)
    except (ConfigError, StartupError, DropError) as e:
        sys.stderr.write(f"hv-vss-agent: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _replace(cfg: config.AgentConfig, **changes: object) -> config.AgentConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
