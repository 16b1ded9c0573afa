"""The pure parts of `cdcengine bench`: statistics, lag and latency arithmetic, checksum
comparison, goals, report rendering, and the process-tree RSS sampler."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from cdcengine.bench.bytecode import compile_engine
from cdcengine.bench.engine import when_committed
from cdcengine.bench.lake import Lake, differences, same
from cdcengine.bench.procs import RssSampler, timed_run, tree_rss
from cdcengine.bench.report import render
from cdcengine.bench.stats import (
    GOALS,
    commit_to_visible,
    lag_series,
    percentile,
    ratio,
    summary,
)


def test_summary_and_percentiles() -> None:
    assert summary([3.0, 1.0, 2.0]) == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0}
    assert summary([])["median"] is None
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(None, 100.0) is None
    assert ratio(1.0, 0.0) is None


def test_commit_to_visible_uses_the_first_commit_holding_the_transaction() -> None:
    txns = [(100, 10.0), (200, 10.5), (300, 11.0), (999, 12.0)]
    # commits out of order on input; a later commit with a smaller position does not count
    commits = [(11.8, 350), (10.2, 100), (11.2, 250)]
    lat = commit_to_visible(txns, commits)
    assert lat == pytest.approx([0.2, 0.7, 0.8])  # 999 never durable: left out


def test_lag_series_seconds_and_bytes() -> None:
    wal = [(0.0, 100), (1.0, 200), (2.0, 300), (3.0, 400)]
    applied = [(1.5, 100), (2.5, 300), (3.5, 250)]
    series = lag_series(wal, applied)
    assert series[0] == pytest.approx((1.5, 0.5, 100))  # 200 reached at 1.0, not applied
    assert series[1] == pytest.approx((2.5, 0.0, 0))
    assert series[2] == pytest.approx((3.5, 1.5, 150))  # beyond 250 since 2.0 (300)
    assert lag_series([], applied) == []


def test_checksums_compare_numbers_as_numbers() -> None:
    src = {"rows": "3", "sum_d": "10.50", "sum_id": "6"}
    assert same(src, {"rows": "3", "sum_d": "10.5", "sum_id": "6"})
    assert not same(src, {"rows": "3", "sum_d": "10.51", "sum_id": "6"})
    assert not same(src, {"rows": "3", "sum_d": "10.50"})
    assert differences(src, {"rows": "3", "sum_d": "10.5", "sum_id": "7"}) == {
        "sum_id": ["6", "7"]}


def test_goals_mark_a_miss_as_a_miss() -> None:
    assert GOALS["insert.consolidated"].evaluate(0.85)["verdict"] == "MISS"
    assert GOALS["insert.consolidated"].evaluate(1.2)["verdict"] == "met"
    assert GOALS["latency.p99"].evaluate(1.2)["verdict"] == "met"
    assert GOALS["bigtxn.rss"].evaluate(600.0)["verdict"] == "MISS"
    assert GOALS["catchup"].evaluate(None)["verdict"] == "n/a"


def _results(ok: bool) -> dict[str, object]:
    fig = {"rate": summary([100.0, 120.0]), "seconds": summary([1.0, 1.2]),
           "peak_rss_mb": summary([200.0]), "runs": 2, "failed": 0}
    return {
        "started_at": "2026-01-01T00:00:00+00:00", "ok": ok,
        "failures": [] if ok else ["insert consolidated rep 0: wrong result"],
        "machine": {"host": "h", "cpu_count": 2, "cpu_model": "cpu", "memory_gb": 4.0},
        "versions": {"cdcengine": "0.1.0", "git_commit": "abc", "python": "3.11"},
        "source": {"engine": "postgresql", "version": "15", "where": "here", "settings": {}},
        "settings": {"rows": 1000, "repeat": 2, "workloads": ["insert"],
                     "engine_settings": {}},
        "load_before": [0.1], "load_after": [0.2],
        "workloads": {"insert": {
            "figures": {"pg_recvlogical": fig,
                        "engine_consolidated": {**fig, "ratio_vs_pg_recvlogical": 0.81}},
            "goals": [GOALS["insert.consolidated"].evaluate(0.81)]}},
        "legs": [],
    }


def test_report_renders_figures_goals_and_failures() -> None:
    text = render(_results(True))
    assert "PASSED" in text
    assert "| engine_consolidated | 110 (100–120)" in text
    assert "0.81×" in text
    assert "❌ MISS" in text
    assert "FAILED — insert consolidated rep 0: wrong result" in render(_results(False))


def test_rss_sampler_sees_a_child_and_its_descendants() -> None:
    code = ("import subprocess, sys, time\n"
            "b = bytearray(60 * 2**20)\n"
            "c = subprocess.Popen([sys.executable, '-c', "
            "'b = bytearray(40 * 2**20); import time; time.sleep(3)'])\n"
            "time.sleep(3); c.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        sampler = RssSampler(proc.pid, interval_s=0.05).start()
        time.sleep(1.5)
        sampler.stop()
        assert sampler.peak > 100 * 2**20  # both processes' memory counted
        assert len(sampler.series) > 5
        assert all(b >= 0 for _, b in sampler.series)
    finally:
        proc.kill()
        proc.wait()
    import psutil

    with pytest.raises(psutil.NoSuchProcess):
        tree_rss(psutil.Process(proc.pid))


def test_timed_run_to_exit_and_until_done() -> None:
    run = timed_run([sys.executable, "-c", "import time; time.sleep(0.3)"])
    assert run.reached
    assert run.returncode == 0
    assert 0.25 < run.seconds < 5
    t0 = time.monotonic()
    run = timed_run([sys.executable, "-c", "import time; time.sleep(60)"],
                    done=lambda: time.monotonic() - t0 > 0.5)
    assert run.reached
    assert run.seconds < 5  # stopped at done, then SIGTERM
    failed = timed_run([sys.executable, "-c", "raise SystemExit(3)"])
    assert not failed.reached
    assert failed.returncode == 3


def test_engine_byte_code_is_compiled_before_the_legs(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile_engine` runs the build's own Python and compiles both packages in place, even
    under PYTHONDONTWRITEBYTECODE (which only stops the import system from writing): a leg
    timed from process start must not compile the engine from source at every start."""
    for name in ("cdcengine", "cdcengine_postgres"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "sub" / "__init__.py").write_text("X = 1\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # these two packages, not the real ones
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    done = compile_engine(sys.executable)
    assert done["ok"] is True
    assert sorted(done["dirs"]) == [str(tmp_path / "cdcengine"),
                                    str(tmp_path / "cdcengine_postgres")]
    assert list((tmp_path / "cdcengine_postgres" / "sub" / "__pycache__").glob("__init__*.pyc"))
    assert "NOT compiled" not in render({**_results(True), "bytecode": [done]})
    failed = compile_engine(str(tmp_path / "no-such-python"))
    assert failed["ok"] is False and "error" in failed
    assert "NOT compiled" in render({**_results(True), "bytecode": [failed]})


def test_a_leg_reads_the_table_only_after_a_new_commit(tmp_path: Path) -> None:
    """The done-check of a timed leg lists `_delta_log` (cheap) and reads the table only when a
    commit appeared since it last said no: polling every 20 ms must not take the engine's CPU."""
    path = str(tmp_path / "t")
    lake = Lake(path)
    assert lake.log_mark() == -1  # no table yet
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        return lake.records() >= 3

    done = when_committed([lake], check)
    assert not done() and len(calls) == 1  # the first look always reads
    assert not done() and not done() and len(calls) == 1  # nothing new: not read again
    write_deltalake(path, pa.table({"id": [1, 2]}))
    assert lake.log_mark() == 1
    assert not done() and len(calls) == 2  # a commit: read, 2 rows, not done
    assert not done() and len(calls) == 2
    write_deltalake(path, pa.table({"id": [3]}), mode="append")
    assert done() and len(calls) == 3
    assert Lake("s3://bucket/t").log_mark() is None  # no cheap listing: always read
