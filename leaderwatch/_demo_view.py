"""What ``leaderwatch demo`` shows: a live timeline for people, or JSON lines for programs.

Every step of the demo is one *event* (a name and fields). :class:`JSONView`
writes each as one JSON object per line, ``{"event": ..., "t": ..., ...}``,
with ``t`` in seconds since the demo started. :class:`TextView` turns them
into a readable timeline: requests with an ordinary route (served directly, or
after one redirect) are folded into one line per leader once a few were shown;
every other route, election, fault and failover gets its own line; a
progress line at the bottom (on a terminal) says what the demo waits for.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

import anyio
import click

__all__ = ["JSONView", "TextView", "View"]

_SPINNER: Final = "|/-\\"
_FRAME_SECONDS: Final = 0.1
# Requests shown in full after each change of leader before ordinary ones are folded.
_SHOWN_AFTER_CHANGE: Final = 3

_HOP_LABELS: Final = {
    "served": ("200", "green"),
    "redirect": ("307", "cyan"),
    "no_leader": ("503", "yellow"),
    "refused": ("refused", "red"),
    "timeout": ("timeout", "red"),
    "broken": ("no response", "red"),
}


class View:
    """Where the demo's events go; subclasses render them."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._started = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the view was made (the demo's clock for ``t``)."""
        return time.monotonic() - self._started

    def event(self, name: str, **fields: Any) -> None:
        """Show one event."""
        raise NotImplementedError

    def phase(self, text: str) -> None:
        """Say what the demo waits for now (progress only)."""

    def counts(self, sent: int, failed: int) -> None:
        """The client's request counters (progress only)."""

    async def animate(self) -> None:
        """Keep the progress line moving until cancelled (if there is one)."""

    def close(self) -> None:
        """Remove the progress line, if any."""


class JSONView(View):
    """One JSON object per event and line, flushed at once; nothing else on stdout."""

    def event(self, name: str, **fields: Any) -> None:
        record = {"event": name, "t": round(self.elapsed(), 4), **fields}
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()


class TextView(View):
    """A readable timeline, coloured when ``color``, with a progress line when ``progress``."""

    def __init__(self, out: TextIO, *, color: bool, progress: bool) -> None:
        super().__init__(out)
        self._color = color
        self._progress = progress
        self._phase = "starting"
        self._phase_since = time.monotonic()
        self._sent = 0
        self._failed = 0
        self._frame = 0
        self._footer_shown = False
        self._shown_since_change = 0
        self._folded: list[dict[str, Any]] = []
        self._folded_key: tuple[str, int] | None = None
        self._names: dict[str, str] = {}

    # -- progress ---------------------------------------------------------------------

    def phase(self, text: str) -> None:
        if text != self._phase:
            self._phase = text
            self._phase_since = time.monotonic()
            self._draw_footer()

    def counts(self, sent: int, failed: int) -> None:
        self._sent, self._failed = sent, failed

    async def animate(self) -> None:
        if not self._progress:
            return
        while True:
            await anyio.sleep(_FRAME_SECONDS)
            self._frame += 1
            self._draw_footer()

    def close(self) -> None:
        self._progress = False
        self._clear_footer()
        self._out.flush()

    def _draw_footer(self) -> None:
        if not self._progress:
            return
        spinner = _SPINNER[self._frame % len(_SPINNER)]
        waited = time.monotonic() - self._phase_since
        failed = f", {self._failed} failed" if self._failed else ", 0 failed"
        text = f"{spinner} {self._phase} ({waited:.1f} s) | {self._sent} requests{failed}"
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self._out.write("\r\x1b[2K" + self._style(text[:width], dim=True))
        self._out.flush()
        self._footer_shown = True

    def _clear_footer(self) -> None:
        if self._footer_shown:
            self._out.write("\r\x1b[2K")
            self._footer_shown = False

    # -- lines ------------------------------------------------------------------------

    def _style(self, text: str, **style: Any) -> str:
        return click.style(text, **style) if self._color else text

    def _line(self, text: str, *, at: float | None = None) -> None:
        self._clear_footer()
        stamp = "" if at is None else self._style(f"{at:7.3f}s  ", dim=True)
        self._out.write(stamp + text + "\n")
        self._draw_footer()
        self._out.flush()

    def _name(self, node: str | None) -> str:
        return "?" if node is None else node

    def event(self, name: str, **fields: Any) -> None:
        at = self.elapsed()
        if name == "request" and self._fold(fields):
            return
        self._flush_folded()
        handler: Callable[[float, dict[str, Any]], None] | None = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(at, fields)

    # -- folding ordinary requests ----------------------------------------------------

    def _fold(self, fields: dict[str, Any]) -> bool:
        key = (fields["node"], fields["epoch"])
        if not _ordinary(fields["route"]) or self._shown_since_change < _SHOWN_AFTER_CHANGE:
            self._shown_since_change += 1
            return False
        if self._folded_key != key:
            self._flush_folded()
            self._folded_key = key
        self._folded.append(fields)
        return True

    def _flush_folded(self) -> None:
        folded, self._folded = self._folded, []
        if not folded:
            return
        node, epoch = folded[0]["node"], folded[0]["epoch"]
        # Where each request entered: at the leader, at a follower, at a node that was down.
        entries = [item["route"][0]["result"] for item in folded]
        direct = entries.count("served")
        redirected = entries.count("redirect")
        refused = entries.count("refused")
        median = statistics.median(item["ms"] for item in folded)
        first, last = folded[0]["ticket"], folded[-1]["ticket"]
        tickets = f"ticket {first}" if first == last else f"tickets {first}-{last}"
        count = f"{len(folded)} more request" + ("s" if len(folded) > 1 else "")
        ways = f"{direct} direct, {redirected} via a 307"
        if refused:
            ways += f", {refused} first refused by a stopped node"
        text = (
            f"        ... {count} served by {node} at epoch {epoch} ({ways}), {tickets}, "
            f"median {median:.1f} ms"
        )
        self._line(self._style(text, dim=True))

    # -- one method per event ---------------------------------------------------------

    def _on_demo_started(self, at: float, f: dict[str, Any]) -> None:
        title = self._style("leaderwatch demo", bold=True)
        self._line(
            f"{title}: {f['nodes']} node processes elect a leader through a file lock in\n"
            f"{f['directory']} and serve fenced tickets over HTTP behind\n"
            "LeaderRedirectMiddleware. A client asks random nodes through LeaderAwareTransport\n"
            f"(307s followed, 503s retried). {f['rounds']} round(s): SIGKILL the leader, then stop"
            " the next one\nwith SIGTERM; the outage is the time from the fault to the client's"
            " first ticket\nfrom the new leader.\n"
        )

    def _on_node_started(self, at: float, f: dict[str, Any]) -> None:
        verb = "restarted" if f["restart"] else "started"
        self._line(f"{f['node']:<8}{verb}, pid {f['pid']}, on {f['endpoint']}", at=at)

    def _on_node_ready(self, at: float, f: dict[str, Any]) -> None:
        if f["state"] == "leader":
            view = f"leader at epoch {f['epoch']}"
        elif f["leader"] is not None:
            view = f"follows {f['leader']} at epoch {f['epoch']}"
        else:
            view = "knows no leader yet"
        self._line(f"{f['node']:<8}ready: {view}", at=at)

    def _on_leader_elected(self, at: float, f: dict[str, Any]) -> None:
        self._shown_since_change = 0
        text = self._style(f"* {f['node']} leads at epoch {f['epoch']}", fg="green", bold=True)
        source = "its status endpoint" if f["source"] == "status" else "its first ticket"
        self._line(f"{text} (seen in {source})", at=at)

    def _route(self, route: list[dict[str, Any]]) -> str:
        hops = []
        for index, hop in enumerate(route):
            label, colour = _HOP_LABELS.get(hop["result"], (str(hop["status"]), "magenta"))
            following = route[index + 1]["node"] if index + 1 < len(route) else None
            if hop["result"] == "redirect" and hop["to"] != following:
                # The client did not follow this one (it names a node that just failed).
                label += f" to {hop['to']}"
            hops.append(f"{hop['node']} {self._style(label, fg=colour)}")
        return " > ".join(hops)

    def _on_request(self, at: float, f: dict[str, Any]) -> None:
        repeated = " (repeated: same idempotency key)" if f["repeated"] else ""
        self._line(
            f"#{f['n']:<5} {self._route(f['route'])}   ticket {f['ticket']} at epoch "
            f"{f['epoch']}, {f['ms']:.1f} ms{repeated}",
            at=at,
        )

    def _on_request_failed(self, at: float, f: dict[str, Any]) -> None:
        text = self._style(f"#{f['n']:<5} FAILED: {f['error']}", fg="red", bold=True)
        self._line(f"{text}  route: {self._route(f['route'])}", at=at)

    def _on_fault(self, at: float, f: dict[str, Any]) -> None:
        self._line("")
        action = "kill -9" if f["kind"] == "SIGKILL" else "graceful stop"
        text = self._style(
            f"round {f['round']}: {f['kind']} {f['node']} ({action}), the leader at epoch "
            f"{f['epoch']}, pid {f['pid']}",
            fg="red",
            bold=True,
        )
        self._line(text, at=at)

    def _on_failover(self, at: float, f: dict[str, Any]) -> None:
        self._shown_since_change = 0
        text = self._style(f"outage {f['outage_ms']:.1f} ms", fg="yellow", bold=True)
        self._line(
            f"failover after {f['kind']}: {f['from_node']} (epoch {f['from_epoch']}) -> "
            f"{f['to_node']} (epoch {f['to_epoch']}); client-visible {text} "
            f"(fault to first ticket from {f['to_node']})",
            at=at,
        )

    def _on_node_exited(self, at: float, f: dict[str, Any]) -> None:
        code = f["returncode"]
        how = f"killed by {f['signal']}" if f["signal"] else f"exited with status {code}"
        self._line(f"{f['node']:<8}{how}, {f['ms']:.0f} ms after the signal", at=at)

    def _on_interrupted(self, at: float, f: dict[str, Any]) -> None:
        self._line(self._style(f"interrupted ({f['signal']}): stopping the nodes", fg="red"), at=at)

    def _on_summary(self, at: float, f: dict[str, Any]) -> None:
        bold: Callable[[str], str] = lambda text: self._style(text, bold=True)  # noqa: E731
        checks = f["checks"]
        lines = [
            "",
            bold(f"Summary: {f['rounds']} round(s), {f['nodes']} nodes, {f['elapsed_s']:.1f} s"),
            f"  requests  {f['requests']} sent, {f['served']} served, "
            + self._verdict(f"{f['failed']} failed", f["failed"] == 0),
            f"  tickets   {f['ledger_tickets']} in the ledger, "
            + self._verdict(
                "none issued twice, in request order"
                if checks["tickets_in_order"] and checks["ledger_matches"]
                else "MISMATCH between the ledger and the client",
                checks["tickets_in_order"] and checks["ledger_matches"],
            ),
            f"  epochs    {self._epoch_span(f['epochs'])}: "
            + self._verdict(
                "each served by one node, never going back"
                if checks["one_node_per_epoch"] and checks["epochs_never_decrease"]
                else "SAFETY CHECK FAILED",
                checks["one_node_per_epoch"] and checks["epochs_never_decrease"],
            ),
            "",
        ]
        rows = [("fault", "failovers", "outage median", "outage max")]
        for kind, outage in f["outage_ms"].items():
            if outage["failovers"]:
                rows.append(
                    (
                        kind,
                        str(outage["failovers"]),
                        f"{outage['median']:.1f} ms",
                        f"{outage['max']:.1f} ms",
                    )
                )
        lines += _table(rows, bold)
        lines.append("")
        epoch_rows = [("epoch", "leader", "requests served")]
        epoch_rows += [(str(e["epoch"]), e["node"], str(e["requests"])) for e in f["epochs"]]
        lines += _table(epoch_rows, bold)
        self._line("\n".join(lines))

    def _on_finished(self, at: float, f: dict[str, Any]) -> None:
        left = f["processes_left"]
        stopped = (
            f"all {f['processes']} node processes stopped"
            if left == 0
            else self._style(f"{left} node process(es) could not be stopped", fg="red")
        )
        removed = "removed" if f["directory_removed"] else self._style("NOT removed", fg="red")
        self._line(f"{stopped}; {f['directory']} {removed}.")

    def _verdict(self, text: str, ok: bool) -> str:
        return self._style(text, fg="green" if ok else "red", bold=not ok)

    def _epoch_span(self, epochs: list[dict[str, Any]]) -> str:
        if not epochs:
            return "none served"
        return f"{epochs[0]['epoch']} -> {epochs[-1]['epoch']}"


def _ordinary(route: list[dict[str, Any]]) -> bool:
    """Served, perhaps after refused connections (a node down) and one followed 307."""
    results = [hop["result"] for hop in route]
    if results[-1:] != ["served"] or results.count("redirect") > 1:
        return False
    for index, hop in enumerate(route[:-1]):
        if hop["result"] == "redirect" and hop["to"] != route[index + 1]["node"]:
            return False
        if hop["result"] not in ("redirect", "refused"):
            return False
    return True


def _table(rows: Sequence[Sequence[str]], header: Callable[[str], str]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        text = "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(header(text.rstrip()) if index == 0 else text.rstrip())
    return lines
