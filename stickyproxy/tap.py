"""``twistd stickyproxy``: command-line options and the service they make."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from stickyproxy.config import Config, load_config
from stickyproxy.errors import ConfigError


class Options(usage.Options):
    """``twistd stickyproxy -c FILE [--check] [--ready-file PATH]``."""

    synopsis = "[options]"
    optParameters = [
        ["config", "c", None, "configuration file (INI)"],
        ["ready-file", None, None, "write the bound addresses here as JSON once listening"],
    ]
    optFlags = [
        ["check", None, "validate the configuration, print every problem, and exit"],
    ]

    loaded: Config

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            raise usage.UsageError("a configuration file is required: -c FILE")
        try:
            self.loaded = load_config(path)
            _check_workers(self.loaded, path)
        except ConfigError as e:
            if self["check"]:
                for problem in e.problems:
                    print(f"{path}: {problem}", file=sys.stderr)
                raise SystemExit(1) from None
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print(f"{path}: OK")
            raise SystemExit(0)


def _check_workers(config: Config, path: str) -> None:
    """Endpoints that several workers cannot share are configuration problems."""
    if config.proxy.workers > 1:
        from stickyproxy.workers import worker_problems

        problems = worker_problems(config, config.proxy.workers)
        if problems:
            raise ConfigError(problems, path)


def makeService(options: Options) -> IService:
    """Build the proxy service on the reactor twistd installed.

    With ``[proxy] workers`` above 1 this process becomes the master of that
    many worker processes sharing its listening sockets.
    """
    from twisted.internet import reactor

    workers = options.loaded.proxy.workers
    if workers > 1:
        from stickyproxy.workers import WorkerMaster

        master: Any = WorkerMaster(
            options["config"], reactor, workers=workers, ready_file=options["ready-file"]
        )
        return master  # type: ignore[no-any-return]

    from stickyproxy.service import StickyProxyService

    service: Any = StickyProxyService(
        options.loaded,
        reactor,
        ready_file=options["ready-file"],
        config_path=options["config"],
    )
    return service  # type: ignore[no-any-return]
