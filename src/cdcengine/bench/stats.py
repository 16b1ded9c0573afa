"""Pure statistics of the bench: min/median/max, percentiles, lag from WAL positions, and the
goals of issue 15 each figure is held against (a miss is a miss)."""

from __future__ import annotations

import bisect
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """`{"n", "min", "median", "max"}` (None when there are no values)."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values)}


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def ratio(engine: float | None, baseline: float | None) -> float | None:
    if engine is None or not baseline:
        return None
    return engine / baseline


def commit_to_visible(transactions: Sequence[tuple[int, float]],
                      commits: Sequence[tuple[float, int]]) -> list[float]:
    """Seconds from each source transaction's commit to the first Delta commit holding it.

    `transactions`: `(lsn, committed_at epoch seconds)` per source transaction; `commits`:
    `(Delta commit epoch seconds, largest lsn it made durable)`. A transaction is visible at the
    first commit (in time order) whose durable lsn is >= its own; transactions never made
    durable are left out (the caller checks completeness separately).
    """
    ordered = sorted(commits)
    times = [t for t, _ in ordered]
    # the durable position only grows: a running maximum, then bisect on it
    reach: list[int] = []
    top = -1
    for _, lsn in ordered:
        top = max(top, lsn)
        reach.append(top)
    out: list[float] = []
    for lsn, committed in transactions:
        i = bisect.bisect_left(reach, lsn)
        if i < len(reach):
            out.append(times[i] - committed)
    return out


def lag_series(source_wal: Sequence[tuple[float, int]],
               applied: Sequence[tuple[float, int]]) -> list[tuple[float, float, int]]:
    """`(t, lag seconds, lag bytes)` per sample of the applied position: the seconds since the
    source's WAL first reached the applied position (0 when it is at the tip) and the bytes
    behind the source's position at that time. Both inputs are `(t, lsn)` on one clock."""
    src = sorted(source_wal)
    src_t = [t for t, _ in src]
    reach: list[int] = []
    top = -1
    for _, lsn in src:
        top = max(top, lsn)
        reach.append(top)
    out: list[tuple[float, float, int]] = []
    for t, pos in applied:
        k = bisect.bisect_right(src_t, t) - 1  # the source's position at t
        if k < 0:
            continue
        head = reach[k]
        if pos >= head:
            out.append((t, 0.0, 0))
            continue
        i = bisect.bisect_right(reach, pos, hi=k + 1)  # first sample beyond what is applied
        since = src_t[i] if i <= k else t
        out.append((t, max(0.0, t - since), head - pos))
    return out


@dataclass(frozen=True, slots=True)
class Goal:
    """A target of issue 15: `value` compared with `target` (`>=` or `<=`)."""

    name: str
    target: float
    op: str = ">="
    unit: str = "×"

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.target if self.op == ">=" else value <= self.target

    def evaluate(self, value: float | None) -> dict[str, object]:
        met = self.met(value)
        return {"goal": self.name, "target": f"{self.op} {self.target:g}{self.unit}",
                "value": value, "met": met,
                "verdict": "n/a" if met is None else ("met" if met else "MISS")}


#: The issue's "Done when", by figure key.
GOALS: Mapping[str, Goal] = {
    "insert.consolidated": Goal("insert consolidated vs pg_recvlogical", 1.0),
    "insert.append": Goal("insert append vs pg_recvlogical", 1.0),
    "insert.both": Goal("insert both vs pg_recvlogical", 1.0),
    "mixed.consolidated": Goal("mixed consolidated vs pg_recvlogical", 0.4),
    "mixed.append": Goal("mixed append vs pg_recvlogical", 0.8),
    "bigtxn": Goal("big transaction vs pg_recvlogical", 0.8),
    "bigtxn.rss": Goal("big transaction peak RSS", 512.0, "<=", " MB"),
    "insert.rss": Goal("streaming inserts peak RSS", 400.0, "<=", " MB"),
    "mixed.rss": Goal("updates/deletes peak RSS", 512.0, "<=", " MB"),
    "snapshot.rss": Goal("snapshot peak RSS", 512.0, "<=", " MB"),
    "snapshot": Goal("snapshot vs COPY binary", 0.6),
    "latency.p99": Goal("commit→visible p99", 1.5, "<=", " s"),
    "merge.recent": Goal("merge 10k into 10× rows / into 1× rows (recent keys)", 1.5, "<=", "×"),
    "catchup": Goal("catch-up vs pg_recvlogical", 2.0),
    "steady.p99": Goal("steady lag p99 / median merge time", 3.0, "<=", "×"),
    "steady.growth": Goal("steady lag peak, last half / first half after minute 1", 1.2,
                          "<=", "×"),
}


_COMMITTED = re.compile(r"delta_committed\b.*?\bduration_ms=([0-9.]+).*?\bkind=consolidated")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def merge_seconds(log_text: str) -> list[float]:
    """Durations of the consolidated commits (merges) in an engine log (console format)."""
    out = []
    for line in log_text.splitlines():
        m = _COMMITTED.search(_ANSI.sub("", line))
        if m:
            out.append(float(m.group(1)) / 1000)
    return out


def lag_growth(series: Sequence[tuple[float, float]], *, after: float,
               until: float) -> float | None:
    """Peak lag over the second half of (after, until] divided by the peak over its first
    half: about 1 when the lag levelled off, above when it keeps growing. `series`: (t, lag)
    with t on the same clock as `after`/`until`."""
    mid = (after + until) / 2
    first = [lag for t, lag in series if after < t <= mid]
    second = [lag for t, lag in series if mid < t <= until]
    if not first or not second or max(first) <= 0:
        return None
    return max(second) / max(first)


__all__ = ["GOALS", "Goal", "commit_to_visible", "lag_growth", "lag_series", "merge_seconds",
           "percentile", "rate", "ratio", "summary"]
