"""``python -m stickyproxy``: offline tools for a configuration file.

``check``
    Validate a configuration, including building its listening endpoints
    with Twisted (without listening), and print every problem, one per line.

``route``
    Print, for each client address, the server a client *without* a
    persistence cookie is sent to. The answer comes from the routing code
    the proxy itself runs (:class:`stickyproxy.pool.Pool` and
    :func:`stickyproxy.hashring.address_key`), so it can be used to plan a
    cut-over or to see which clients move when a server is taken out.

Exit status: 0 on success, 1 when the configuration or an address is bad,
2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO

from stickyproxy import __version__
from stickyproxy.config import Config, load_config
from stickyproxy.errors import ConfigError, ConfigProblem

__all__ = ["build_parser", "endpoint_problems", "main", "route"]


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
