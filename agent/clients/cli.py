"""The clients' command lines: `hv-vss-agent status` and `hv-vss-agent hook`.

Kept apart from agent/cli.py so that the daemon's root phase never loads them.
"""

from __future__ import annotations

import argparse
import sys

from agent import config
from agent.cli import Parser
from privileged.config import ConfigError

# Not in the state directory (/run/hv-vss-agent, root's alone): clients must pass through.
DEFAULT_NOTIFY_SOCKET = "/run/hv-vss-agent-sockets/notify.sock"
DEFAULT_CONTROL_SOCKET = "/run/hv-vss-agent-sockets/control.sock"


def status_parser() -> Parser:
    p = Parser(prog="hv-vss-agent status",
               description="What the running agent is doing, and what it did lately.")
    p.add_argument("--json", action="store_true", help="the whole answer, as JSON")
    p.add_argument("--watch", nargs="?", type=seconds, const=1.0, metavar="SECONDS",
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
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help="at most this long for the freeze hooks together, and for each "
                        "thaw hook (the agent may allow less)")
    p.add_argument("--wait", action="store_true",
                   help="if the agent is not running yet, wait for it instead of failing")
    p.add_argument("-d", dest="debug", action="store_true", help="debug output")
    return p


def seconds(text: str) -> float:
    """A number of seconds from the command line, 0.1 to 3600."""
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
