"""The ``[admin]`` endpoint: server states as an HTML page and as JSON.

``GET /`` is a self-refreshing table for people; ``GET /stats.json`` returns
``{"servers": [...], "frontend": {...}}`` where each server object is
:meth:`stickyproxy.pool.Pool.snapshot`'s. The data source is injected, as in
prometheus_client's Twisted resource, so the page is tested without a proxy.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

Snapshot = Callable[[], dict[str, Any]]


class StatsJSON(Resource):
    """``/stats.json``."""

    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(self.snapshot(), indent=1).encode()


_COLUMNS = (
    ("name", "Server"),
    ("address", "Address"),
    ("status", "Status"),
    ("last_check", "Last check"),
    ("weight", "Weight"),
    ("active", "Active"),
    ("maxconn", "Max"),
    ("requests", "Requests"),
    ("transitions", "Changes"),
)


class StatusPage(Resource):
    """``/``: one row per server, refreshing itself every few seconds."""

    isLeaf = True

    def __init__(self, snapshot: Snapshot, refresh: int = 5) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.refresh = refresh

    def render_GET(self, request: Request) -> bytes:
        data = self.snapshot()
        header = "".join(f"<th>{html.escape(title)}</th>" for _, title in _COLUMNS)
        rows = []
        for server in data["servers"]:
            state = html.escape(str(server["state"]))
            cells = "".join(
                f"<td>{html.escape('' if server[key] is None else str(server[key]))}</td>"
                for key, _ in _COLUMNS
            )
            rows.append(f'<tr class="{state}">{cells}</tr>')
        frontend = data["frontend"]
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{self.refresh}">
<title>stickyproxy status</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
tr.UP td:nth-child(3) {{ color: #060; font-weight: bold; }}
tr.DOWN td:nth-child(3), tr.MAINT td:nth-child(3) {{ color: #b00; font-weight: bold; }}
tr.DRAIN td:nth-child(3) {{ color: #a60; font-weight: bold; }}
</style></head><body>
<h1>stickyproxy</h1>
<p>Client connections: {int(frontend["connections"])}</p>
<table><tr>{header}</tr>
{"".join(rows)}
</table>
<p><a href="stats.json">stats.json</a></p>
</body></html>
"""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return page.encode()


def admin_site(snapshot: Snapshot) -> Site:
    """The admin web site: ``/`` and ``/stats.json``."""
    root = Resource()
    page = StatusPage(snapshot)
    root.putChild(b"", page)
    root.putChild(b"stats.json", StatsJSON(snapshot))
    site = Site(root)
    site.noisy = False
    return site
