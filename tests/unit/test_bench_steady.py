"""The steady workload's figures: merge times from the engine log, lag growth, goals."""

from __future__ import annotations

from cdcengine.bench.stats import GOALS, lag_growth, merge_seconds

LOG = """\
2026-12-07T02:15:21Z [info     ] delta_committed                deleted=0 delta_version=105 \
duration_ms=2606.5 inserted=0 kind=consolidated lsn=0/A1 rows=6000 table=public.t updated=5999
2026-12-07T02:15:21Z [info     ] batch_committed                duration_ms=9999 lsn=0/A1 rows=1
2026-12-07T02:15:22Z [info     ] delta_committed                deleted=0 delta_version=9 \
duration_ms=12.0 inserted=5 kind=append lsn=0/A2 rows=5 table=public.t updated=0
\x1b[2m2026-12-07T02:15:23Z\x1b[0m [info     ] \x1b[1mdelta_committed\x1b[0m \
deleted=0 delta_version=106 duration_ms=\x1b[35m1500\x1b[0m inserted=0 kind=consolidated rows=1
"""


def test_merge_seconds_reads_consolidated_commits_only() -> None:
    assert merge_seconds(LOG) == [2.6065, 1.5]


def test_lag_growth_is_one_when_levelled_and_above_when_growing() -> None:
    level = [(float(t), float(t % 10)) for t in range(130)]
    growing = [(float(t), float(t)) for t in range(130)]
    assert lag_growth(level, after=60, until=120) == 1.0
    assert lag_growth(growing, after=60, until=120) == 120 / 90
    assert lag_growth([], after=60, until=120) is None
    assert GOALS["steady.growth"].evaluate(1.0)["met"] is True
    assert GOALS["steady.p99"].evaluate(3.5)["met"] is False
