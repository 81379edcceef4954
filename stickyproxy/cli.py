"""``python -m stickyproxy``: tools for a configuration file and a running proxy.

``check``
    Validate a configuration, including building its listening endpoints
    with Twisted (without listening), and print every problem, one per line.

``route``
    Print, for each client address, the server a client *without* a
    persistence cookie is sent to. The answer comes from the routing code
    the proxy itself runs (:class:`stickyproxy.pool.Pool` and
    :func:`stickyproxy.hashring.address_key`), so it can be used to plan a
    cut-over or to see which clients move when a server is taken out.

``ctl``
    Talk to a running proxy's ``[admin]`` endpoint (:mod:`stickyproxy.admin`):
    ``status`` prints a table of the servers, ``state NAME ready|drain|maint``
    and ``shutdown-sessions NAME`` change them. The endpoint comes from
    ``--admin`` or ``$STICKYPROXY_ADMIN``, the token from ``--token`` or
    ``$STICKYPROXY_ADMIN_TOKEN`` (the environment keeps it out of ``ps``).

Exit status: 0 on success, 1 when the configuration or an address is bad or
the proxy refused or could not be reached, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from stickyproxy import __version__
from stickyproxy.config import Config, load_config
from stickyproxy.errors import ConfigError, ConfigProblem

__all__ = ["build_parser", "ctl", "endpoint_problems", "main", "route"]

#: Where ``ctl`` looks when neither ``--admin`` nor ``$STICKYPROXY_ADMIN`` says
#: (the ``[admin] listen`` of the sample configuration).
DEFAULT_ADMIN = "http://127.0.0.1:9000"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m stickyproxy``."""
    parser = argparse.ArgumentParser(
        prog="python -m stickyproxy",
        description="Tools for stickyproxy configuration files. "
        "Run the proxy itself with: twistd stickyproxy -c FILE",
    )
    parser.add_argument("--version", action="version", version=f"stickyproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate a configuration file",
        description="Validate a configuration file and print every problem found.",
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="configuration file")

    route = commands.add_parser(
        "route",
        help="show which server new clients are sent to",
        description="For each client address, print 'ADDRESS SERVER': the server a client "
        "without a persistence cookie is sent to. Addresses come from the arguments, or one "
        "per line from standard input when none are given. With hash_function = default the "
        "answer depends on server names and weights only, not on their order in the file.",
    )
    route.add_argument("-c", "--config", required=True, metavar="FILE", help="configuration file")
    route.add_argument(
        "--down",
        action="append",
        default=[],
        metavar="NAME",
        help="treat server NAME as out of service (repeatable)",
    )
    route.add_argument(
        "--drain",
        action="append",
        default=[],
        metavar="NAME",
        help="treat server NAME as draining: it keeps cookie users, takes no new ones (repeatable)",
    )
    route.add_argument("addresses", nargs="*", metavar="ADDRESS", help="client IP address")

    ctl_parser = commands.add_parser(
        "ctl",
        help="show or change a running proxy's servers",
        description="Talk to the [admin] endpoint of a running proxy.",
    )
    ctl_parser.add_argument(
        "--admin",
        default=os.environ.get("STICKYPROXY_ADMIN", DEFAULT_ADMIN),
        metavar="URL",
        help=f"the admin endpoint (default: $STICKYPROXY_ADMIN or {DEFAULT_ADMIN})",
    )
    ctl_parser.add_argument(
        "--token",
        default=os.environ.get("STICKYPROXY_ADMIN_TOKEN") or None,
        metavar="TOKEN",
        help="the [admin] token (default: $STICKYPROXY_ADMIN_TOKEN)",
    )
    ctl_parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="give up after this long"
    )
    actions = ctl_parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("status", help="print the servers' states and traffic")
    actions.add_parser("reload", help="re-read the configuration file (as SIGHUP)")
    state = actions.add_parser("state", help="set a server's administrative state")
    state.add_argument("name", metavar="NAME", help="server name")
    state.add_argument("state", choices=("ready", "drain", "maint"), help="the new state")
    weight = actions.add_parser("weight", help="set a server's weight (0 drains it)")
    weight.add_argument("name", metavar="NAME", help="server name")
    weight.add_argument("weight", type=int, help="the new weight, 0 to 256")
    shutdown = actions.add_parser(
        "shutdown-sessions", help="close every client connection of a server"
    )
    shutdown.add_argument("name", metavar="NAME", help="server name")
    shutdown.add_argument(
        "--spread",
        metavar="DURATION",
        help="send WebSockets a Close frame (1001) spread over this time (e.g. 30s) "
        "instead of cutting every connection at once",
    )
    return parser


def _print_problems(error: ConfigError, out: TextIO) -> None:
    for problem in error.problems:
        print(f"{error.source}: {problem}", file=out)


def endpoint_problems(config: Config) -> list[ConfigProblem]:
    """Build every listening endpoint with Twisted, without listening.

    :mod:`stickyproxy.config` cannot import Twisted, so it checks endpoint
    strings only lightly; this catches the rest (unknown keywords, missing
    TLS key files). ``systemd:`` endpoints are skipped: they can only be built
    inside the service that systemd started.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    problems = []
    places = [("proxy", "listen", description) for description in config.proxy.listen]
    if config.admin.listen is not None:
        places.append(("admin", "listen", config.admin.listen))
    for section, key, description in places:
        if description.startswith("systemd:"):
            continue
        try:
            serverFromString(reactor, description)  # type: ignore[no-untyped-call]
        except Exception as exc:  # any failure means the endpoint is unusable
            problems.append(ConfigProblem(section, key, f"{description!r}: {exc}"))
    return problems


def _check(path: str, out: TextIO) -> int:
    try:
        config = load_config(path)
        problems = endpoint_problems(config)
        if problems:
            raise ConfigError(problems, path)
    except ConfigError as error:
        _print_problems(error, out)
        return 1
    print(f"{path}: OK", file=out)
    return 0


def _addresses(arguments: Sequence[str], stdin: TextIO) -> Iterator[str]:
    if arguments:
        yield from arguments
        return
    for line in stdin:
        address = line.strip()
        if address:
            yield address


def route(
    config: Config,
    addresses: Iterable[str],
    *,
    down: Sequence[str] = (),
    drain: Sequence[str] = (),
    out: TextIO,
    err: TextIO,
) -> int:
    """Print ``ADDRESS SERVER`` for each address; ``-`` when no server is usable.

    :param config: a validated configuration.
    :param addresses: client IP addresses, as text.
    :param down: names of servers to treat as out of service.
    :param drain: names of servers to treat as draining.
    :returns: 0, or 1 when some address was not a valid IP address.
    """
    # Imported here so that ``check`` needs nothing but the configuration.
    from stickyproxy.hashring import address_key
    from stickyproxy.pool import Pool

    pool = Pool(config.servers, config.health, config.balance)
    # For a client without a cookie, DOWN and MAINT route the same way (the
    # server is off the ring), and MAINT works for servers without checks too.
    for name in down:
        pool.set_admin(name, "maint")
    for name in drain:
        pool.set_admin(name, "drain")
    if config.balance.hash_key != "source":
        # The proxy falls back to the client address when the request lacks
        # the configured header or query parameter.
        print(
            f"note: [balance] hash_key = {config.balance.hash_key}:"
            f"{config.balance.hash_key_name}; showing requests without it",
            file=err,
        )
    status = 0
    for address in addresses:
        try:
            key = address_key(address)
        except ValueError:
            print(f"{address}: not an IP address", file=err)
            status = 1
            continue
        decision = pool.choose([], key)
        if decision.server is None:
            print(f"{address} -", file=out)
            print(f"{address}: no server takes new clients", file=err)
        else:
            print(f"{address} {decision.server.name}", file=out)
    return status


class _AdminError(Exception):
    """The admin endpoint could not be reached or refused the request."""


def _admin_request(
    base: str, path: str, *, form: Mapping[str, str] | None, token: str | None, timeout: float
) -> Any:
    """One request to the admin endpoint; return its decoded JSON body.

    :raises _AdminError: with a message for people.
    """
    if "://" not in base:
        base = "http://" + base
    data = None if form is None else urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(base.rstrip("/") + path, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    request.add_header("User-Agent", f"stickyproxy-ctl/{__version__}")
    # The proxy logs this with every change it makes.
    request.add_header("X-Requested-By", f"{_user()}@{socket.gethostname()} via stickyproxy ctl")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            try:
                reason = json.load(error)["error"]
            except (ValueError, KeyError, TypeError):
                reason = error.reason
        raise _AdminError(f"{error.code} {reason}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise _AdminError(f"cannot reach {base}: {reason}") from error


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return f"uid {os.getuid()}"


_STATUS_COLUMNS = ("SERVER", "STATE", "STATUS", "WEIGHT", "ACTIVE", "TUNNELS", "REQUESTS", "CHECK")


def _status_table(data: Mapping[str, Any]) -> list[str]:
    rows = [_STATUS_COLUMNS]
    for server in data.get("servers", []):
        maxconn = server.get("maxconn")
        rows.append(
            (
                str(server.get("name")),
                str(server.get("state")),
                str(server.get("status")),
                str(server.get("weight")),
                f"{server.get('active')}/{'-' if maxconn == 0 else maxconn}",
                str(server.get("tunnels", "-")),
                str(server.get("requests", "-")),
                str(server.get("last_check") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_STATUS_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    frontend = data.get("frontend", {})
    errors = " ".join(f"{status}={n}" for status, n in frontend.get("errors", {}).items())
    lines.append(
        f"frontend: {frontend.get('connections', '-')} connections, "
        f"{frontend.get('tunnels', '-')} tunnels, {frontend.get('requests', '-')} requests, "
        f"errors: {errors or 'none'}"
    )
    return lines


def ctl(
    admin: str,
    action: str,
    *,
    name: str | None = None,
    state: str | None = None,
    weight: int | None = None,
    spread: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run one ``ctl`` action against the admin endpoint at ``admin``.

    :param admin: the endpoint's URL (``http://`` is assumed without a scheme).
    :param action: ``status``, ``state`` (with ``name`` and ``state``) or
        ``shutdown-sessions`` (with ``name``, and ``spread`` to close
        WebSockets politely over that long).
    :returns: 0, or 1 when the request failed or was refused.
    """
    try:
        if action == "status":
            data = _admin_request(admin, "/stats.json", form=None, token=token, timeout=timeout)
            for line in _status_table(data):
                print(line, file=out)
            return 0
        if action == "reload":
            answer = _admin_request(admin, "/reload", form={}, token=token, timeout=timeout)
            print("reloaded" if answer.get("reloaded") else "reload refused", file=out)
            return 0
        if name is None:
            raise ValueError(f"{action} needs a server name")
        path = f"/servers/{urllib.parse.quote(name, safe='')}"
        if action == "state":
            if state is None:
                raise ValueError("state needs ready, drain or maint")
            answer = _admin_request(
                admin, f"{path}/state", form={"state": state}, token=token, timeout=timeout
            )
            change = answer.get("transition")
            if change:
                print(f"{name}: {change['old']} -> {change['new']}", file=out)
            else:
                print(f"{name}: {state} (state unchanged)", file=out)
            return 0
        if action == "weight":
            if weight is None:
                raise ValueError("weight needs a number")
            answer = _admin_request(
                admin, f"{path}/weight", form={"weight": str(weight)}, token=token, timeout=timeout
            )
            print(f"{name}: weight {answer['weight']}", file=out)
            return 0
        if action == "shutdown-sessions":
            form = {} if spread is None else {"spread": spread}
            answer = _admin_request(
                admin, f"{path}/shutdown-sessions", form=form, token=token, timeout=timeout
            )
            print(f"{name}: closed {answer['closed']} connection(s)", file=out)
            return 0
        raise ValueError(f"unknown action {action!r}")
    except _AdminError as error:
        print(f"stickyproxy ctl {action}: {error}", file=err)
        return 1


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command line and return the exit status.

    :param argv: the arguments after the program name (default: ``sys.argv[1:]``).
    :param stdin: where ``route`` reads addresses when none are given.
    :param stdout: where results go.
    :param stderr: where errors go.
    """
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # --help and --version exit 0; usage errors exit 2.
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help(err)
        return 2
    if args.command == "check":
        return _check(args.config, out)
    if args.command == "ctl":
        return ctl(
            args.admin,
            args.action,
            name=getattr(args, "name", None),
            state=getattr(args, "state", None),
            weight=getattr(args, "weight", None),
            spread=getattr(args, "spread", None),
            token=args.token,
            timeout=args.timeout,
            out=out,
            err=err,
        )

    try:
        config = load_config(args.config)
    except ConfigError as error:
        _print_problems(error, err)
        return 1
    names = {server.name for server in config.servers}
    unknown = sorted(set(args.down + args.drain) - names)
    if unknown:
        print(
            f"{parser.prog} route: unknown server(s) {', '.join(unknown)}; "
            f"{args.config} has {', '.join(sorted(names))}",
            file=err,
        )
        return 2
    return route(
        config,
        _addresses(args.addresses, stdin),
        down=args.down,
        drain=args.drain,
        out=out,
        err=err,
    )
