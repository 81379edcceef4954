"""The results of a run: what each measure means, ratios, the table and the JSON.

A ratio compares stickyproxy with another proxy on one measure. For a rate
(requests/s, messages/s, MB/s) it is stickyproxy's rate over the other's:
above 1 stickyproxy is faster. For a cost (CPU per operation, memory per
connection) it is stickyproxy's cost over the other's: above 1 stickyproxy
spends more.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: results[measure][proxy] = value; a missing value is a failed measurement.
Results = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    is_rate: bool


MEASURES = (
    Measure("http_keepalive_rps", "HTTP keep-alive, no cookie", "req/s", True),
    Measure("http_keepalive_cpu", "  proxy CPU per request", "µs", False),
    Measure("http_keepalive_cookie_rps", "HTTP keep-alive, valid cookie", "req/s", True),
    Measure("http_keepalive_cookie_cpu", "  proxy CPU per request", "µs", False),
    Measure("http_close_rps", "HTTP connection per request", "req/s", True),
    Measure("http_close_cpu", "  proxy CPU per request", "µs", False),
    Measure("ws_msg_rate", "WebSocket round trips", "msg/s", True),
    Measure("ws_msg_cpu", "  proxy CPU per round trip", "µs", False),
    Measure("ws_bulk_rate", "WebSocket bulk echo", "MB/s", True),
    Measure("ws_bulk_cpu", "  proxy CPU per MB echoed", "ms", False),
    Measure("ws_idle_kib", "Memory per open WebSocket", "KiB", False),
)

#: The targets quoted for stickyproxy: (measure, compared with, bound, description).
TARGETS = (
    ("http_keepalive_rps", "haproxy", 0.4, "HTTP keep-alive req/s >= 0.4x HAProxy"),
    ("ws_msg_rate", "relay", 0.9, "WebSocket msg/s >= 0.9x the Twisted relay"),
)
MEMORY_TARGET_KIB = 6.0

PROXY_TITLES = {"stickyproxy": "stickyproxy", "haproxy": "HAProxy", "relay": "relay"}


def ratio(results: Results, key: str, other: str) -> float | None:
    """stickyproxy's value over *other*'s for measure *key* (see module docs)."""
    values = results.get(key, {})
    mine, theirs = values.get("stickyproxy"), values.get(other)
    if mine is None or not theirs:
        return None
    return mine / theirs


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def table(results: Results, proxies: tuple[str, ...]) -> str:
    """A fixed-width table: one row per measure, one column per proxy, then ratios."""
    head = ["measure", "unit", *(PROXY_TITLES[p] for p in proxies), "sp/HAProxy", "sp/relay"]
    rows = [head]
    for m in MEASURES:
        values = results.get(m.key, {})
        cells = [m.label, m.unit, *(_fmt(values.get(p)) for p in proxies)]
        for other in ("haproxy", "relay"):
            r = ratio(results, m.key, other)
            cells.append("-" if r is None else f"{r:.2f}x")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        first = row[0].ljust(widths[0])
        rest = "  ".join(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        lines.append(f"{first}  {rest}")
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def targets(results: Results) -> list[dict[str, Any]]:
    """Each quoted target with the measured figure (reported, never enforced)."""
    out: list[dict[str, Any]] = []
    for key, other, bound, text in TARGETS:
        r = ratio(results, key, other)
        met = None if r is None else r >= bound
        out.append({"target": text, "measured": r, "unit": "x", "met": met})
    kib = results.get("ws_idle_kib", {}).get("stickyproxy")
    out.append(
        {
            "target": f"<= {MEMORY_TARGET_KIB:g} KiB per open WebSocket",
            "measured": kib,
            "unit": "KiB",
            "met": None if kib is None else kib <= MEMORY_TARGET_KIB,
        }
    )
    return out


def targets_text(results: Results) -> str:
    lines = []
    for t in targets(results):
        state = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
        unit = "x" if t["unit"] == "x" else f" {t['unit']}"
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}{unit}"
        lines.append(f"  {t['target']}: {measured} ({state})")
    return "\n".join(lines)


def write_json(
    path: Path,
    *,
    results: Results,
    errors: Mapping[str, list[str]],
    command: str,
    machine: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> None:
    ratios = {
        m.key: {other: ratio(results, m.key, other) for other in ("haproxy", "relay")}
        for m in MEASURES
    }
    document = {
        "command": command,
        "machine": dict(machine),
        "settings": dict(settings),
        "measures": {m.key: {"label": m.label.strip(), "unit": m.unit} for m in MEASURES},
        "results": results,
        "ratios_stickyproxy_over": ratios,
        "targets": targets(results),
        "errors": dict(errors),
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
