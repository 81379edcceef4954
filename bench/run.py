"""Benchmark stickyproxy against HAProxy and a plain Twisted relay, side by side.

::

    .venv/bin/python bench/run.py [--quick] [--json results.json]

Starts fast backends and the three proxies on 127.0.0.1 (OS-chosen ports),
drives HTTP load with wrk and WebSocket load with an asyncio client, reads each
proxy's CPU time and memory from /proc, prints a table with ratios, and stops
every process it started by PID, also on Ctrl-C or an error. See
``bench/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpload
import report
import wsclient
from procs import Children, cpu_seconds, raise_nofile_limit, rss_kib
from proxies import PROXY_NAMES, Launcher, Running

#: File descriptors each process keeps for itself beyond its connections.
FD_HEADROOM = 500


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; ``--quick`` picks smaller ones."""

    wrk_seconds: float
    wrk_connections: int
    wrk_threads: int
    ws_connections: int
    ws_rounds: int
    ws_payload: int
    bulk_bytes: int
    idle_connections: int
    step_timeout: float

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(2, 10, 1, 1000, 20, 32, 50_000_000, 5000, 30)
        return cls(10, 10, 1, 1000, 100, 32, 200_000_000, 5000, 90)


class Run:
    """One benchmark run: results and errors, filled in phase by phase."""

    def __init__(self, launcher: Launcher, settings: Settings, proxies: tuple[str, ...]) -> None:
        self.launcher = launcher
        self.settings = settings
        self.proxies = proxies
        self.results: report.Results = {m.key: {} for m in report.MEASURES}
        self.errors: dict[str, list[str]] = {}

    def _record(self, key: str, proxy: str, value: float) -> None:
        self.results[key][proxy] = value

    def _fail(self, proxy: str, step: str, error: BaseException) -> None:
        message = f"{step}: {type(error).__name__}: {error}"
        self.errors.setdefault(proxy, []).append(message)
        print(f"  !! {proxy} {message}", flush=True)

    def _each_proxy(
        self, phase: str, servers: list[tuple[str, int]], body: Callable[[Running], None]
    ) -> None:
        for name in self.proxies:
            print(f"[{phase}] {name}", flush=True)
            try:
                running = self.launcher.proxy(name, servers, phase)
            except Exception as e:
                self._fail(name, f"{phase} start", e)
                continue
            try:
                body(running)
            finally:
                self.launcher.children.stop(running.child)

    # -- HTTP ----------------------------------------------------------------

    def http_phase(self) -> None:
        servers = self.launcher.http_origin()
        self._each_proxy("http", servers, self._http_cases)

    def _http_cases(self, running: Running) -> None:
        s = self.settings
        url = f"http://127.0.0.1:{running.port}/"
        for case in httpload.CASES:
            try:
                httpload.check_exchange(
                    "127.0.0.1", running.port, case, sticky=running.name != "relay"
                )
                before = cpu_seconds(running.child.pid)
                result = httpload.run_wrk(
                    url,
                    case,
                    threads=s.wrk_threads,
                    connections=s.wrk_connections,
                    seconds=s.wrk_seconds,
                )
                cpu = cpu_seconds(running.child.pid) - before
                if result.errors or result.non_2xx_3xx or not result.requests:
                    raise httpload.HttpCheckError(
                        f"{result.requests} requests, {result.errors} socket errors, "
                        f"{result.non_2xx_3xx} responses >= 400:\n{result.output}"
                    )
            except Exception as e:
                self._fail(running.name, case.name, e)
                continue
            self._record(f"{case.name}_rps", running.name, result.rate)
            self._record(f"{case.name}_cpu", running.name, cpu / result.requests * 1e6)
            print(
                f"  {case.name}: {result.rate:,.0f} req/s, "
                f"{cpu / result.requests * 1e6:.1f} µs CPU/req",
                flush=True,
            )

    # -- WebSocket -------------------------------------------------------------

    def ws_phase(self) -> None:
        servers = self.launcher.ws_origin()
        self._each_proxy("ws", servers, self._ws_steps)

    def _ws_steps(self, running: Running) -> None:
        steps: list[tuple[str, Callable[[Running], Coroutine[Any, Any, None]]]] = [
            ("warm-up", self._ws_warmup),
            ("idle memory", self._ws_idle),
            ("round trips", self._ws_rounds),
            ("bulk", self._ws_bulk),
        ]
        for step, coroutine in steps:
            try:
                running.child.check_alive()
                asyncio.run(asyncio.wait_for(coroutine(running), self.settings.step_timeout))
            except Exception as e:
                self._fail(running.name, f"ws {step}", e)
                if step == "warm-up":
                    return

    async def _ws_warmup(self, running: Running) -> None:
        # The first connections through a fresh process load code and grow
        # pools; do that before any figure is read.
        clients = await wsclient.open_many("127.0.0.1", running.port, 100, 10)
        await wsclient.ping_pong(clients, self.settings.ws_payload, 10)
        wsclient.close_all(clients)

    async def _ws_idle(self, running: Running) -> None:
        count = self.settings.idle_connections
        before = rss_kib(running.child.pid)
        clients = await wsclient.open_many("127.0.0.1", running.port, count, 30)
        try:
            after = rss_kib(running.child.pid)
        finally:
            wsclient.close_all(clients)
        per = (after - before) / count
        self._record("ws_idle_kib", running.name, per)
        print(f"  {count} idle WebSockets: RSS {before} -> {after} KiB, {per:.2f} KiB each")

    async def _ws_rounds(self, running: Running) -> None:
        s = self.settings
        clients = await wsclient.open_many("127.0.0.1", running.port, s.ws_connections, 30)
        try:
            before, start = cpu_seconds(running.child.pid), time.monotonic()
            await wsclient.ping_pong(clients, s.ws_payload, s.ws_rounds)
            elapsed = time.monotonic() - start
            cpu = cpu_seconds(running.child.pid) - before
        finally:
            wsclient.close_all(clients)
        messages = s.ws_connections * s.ws_rounds
        self._record("ws_msg_rate", running.name, messages / elapsed)
        self._record("ws_msg_cpu", running.name, cpu / messages * 1e6)
        print(
            f"  {messages} round trips on {s.ws_connections} connections: "
            f"{messages / elapsed:,.0f} msg/s, {cpu / messages * 1e6:.1f} µs CPU/msg",
            flush=True,
        )

    async def _ws_bulk(self, running: Running) -> None:
        client = await wsclient.open_one("127.0.0.1", running.port, 10)
        try:
            before, start = cpu_seconds(running.child.pid), time.monotonic()
            sent = await wsclient.bulk_echo(client, self.settings.bulk_bytes)
            elapsed = time.monotonic() - start
            cpu = cpu_seconds(running.child.pid) - before
        finally:
            client.close()
        megabytes = sent / 1e6
        self._record("ws_bulk_rate", running.name, megabytes / elapsed)
        self._record("ws_bulk_cpu", running.name, cpu / megabytes * 1e3)
        print(
            f"  bulk {megabytes:.0f} MB echoed: {megabytes / elapsed:.0f} MB/s, "
            f"{cpu / megabytes * 1e3:.2f} ms CPU/MB",
            flush=True,
        )


def machine_info() -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as e:
            return f"unavailable ({e})"
        return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""

    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--proxies",
        default=",".join(PROXY_NAMES),
        help=f"comma-separated subset of {','.join(PROXY_NAMES)}",
    )
    parser.add_argument("--skip-http", action="store_true", help="WebSocket measures only")
    parser.add_argument("--skip-ws", action="store_true", help="HTTP measures only")
    args = parser.parse_args(argv)
    proxies = tuple(p for p in args.proxies.split(",") if p)
    unknown = set(proxies) - set(PROXY_NAMES)
    if unknown or not proxies:
        parser.error(f"--proxies: choose among {', '.join(PROXY_NAMES)}")
    args.proxies = proxies
    return args


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # Unwind like Ctrl-C does, so that the children are stopped.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # A shell may start background jobs with SIGINT ignored; Ctrl-C or kill
    # -INT must still unwind and stop the children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = Settings.for_mode(args.quick)
    # A proxy holds two sockets per proxied connection.
    limit = raise_nofile_limit()
    maxconn = max(1000, (limit - FD_HEADROOM) // 2)
    if settings.idle_connections > maxconn:
        print(f"open-file limit {limit}: idle WebSockets reduced to {maxconn}")
        settings = Settings(**{**asdict(settings), "idle_connections": maxconn})
    command = shlex.join([sys.executable, *sys.argv])
    machine = machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="stickyproxy-bench-") as work:
        children = Children(Path(work))
        run = Run(Launcher(children, Path(work), maxconn), settings, args.proxies)
        try:
            if not args.skip_http:
                run.http_phase()
                children.stop_all()
            if not args.skip_ws:
                run.ws_phase()
        finally:
            children.stop_all()

    print()
    print(report.table(run.results, args.proxies))
    print("\nTargets for stickyproxy (measured, not enforced):")
    print(report.targets_text(run.results))
    if run.errors:
        print("\nFailures:")
        for proxy, messages in run.errors.items():
            for message in messages:
                print(f"  {proxy}: {message}")
    if args.json:
        report.write_json(
            args.json,
            results=run.results,
            errors=run.errors,
            command=command,
            machine=machine,
            settings=asdict(settings),
        )
        print(f"\nJSON written to {args.json}")
    return 1 if run.errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # main() has stopped its children on the way out.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
