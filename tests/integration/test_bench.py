"""`cdcengine bench` end to end against a throwaway cluster (its own): results.json carries the
machine, versions, settings, every leg and min/median/max; every engine leg's correctness check
passed; a deliberately wrong checksum fails the run (exit 1, marked in the JSON, no rate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdcengine", "bench", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)


@pytest.mark.timeout(900)
def test_bench_insert_and_mixed_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _bench(out, "--workloads", "insert,mixed,catchup", "--rows", "20000", "--repeat", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "insert: rep 1/1 engine consolidated" in done.stdout  # progress shown
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] is True
    assert res["failures"] == []
    assert res["machine"]["cpu_count"] >= 1
    assert {"python", "deltalake", "pyarrow", "git_commit"} <= set(res["versions"])
    assert res["source"]["settings"]["fsync"] == "off"
    assert res["settings"]["rows"] == 20000
    assert res["load_before"]
    ins = res["workloads"]["insert"]
    assert ins["changes"] == 20000
    for name in ("pg_recvlogical", "engine_consolidated", "engine_append", "engine_both"):
        fig = ins["figures"][name]
        assert fig["rate"]["n"] == 1
        assert fig["rate"]["min"] <= fig["rate"]["median"] <= fig["rate"]["max"]
    assert ins["figures"]["engine_consolidated"]["ratio_vs_pg_recvlogical"] > 0
    assert {g["verdict"] for g in ins["goals"]} <= {"met", "MISS"}
    mixed = res["workloads"]["mixed"]
    assert mixed["ops"] == {"U": 2000, "D": 200}
    engine_legs = [leg for leg in res["legs"] if leg["leg"] == "engine"]
    assert len(engine_legs) == 6  # insert ×3 modes, mixed ×2 modes, catchup
    # which read path each leg took, from the engine's own log: insert measures the streaming
    # protocol, catchup the SQL catch-up path (forced on whatever the backlog's size)
    paths = {(leg["workload"], leg["label"]): leg["read_path"] for leg in engine_legs}
    assert {p for (w, _), p in paths.items() if w == "insert"} == {"streaming"}
    assert paths[("catchup", "consolidated")] == "catch-up"
    catchup = res["workloads"]["catchup"]["figures"]
    assert catchup["sql_decoding"]["rate"]["n"] == 1
    assert catchup["engine_consolidated"]["read_path"] == "catch-up"
    for leg in engine_legs:
        assert leg["ok"], leg
        assert leg["check"]["ok"] is True
        assert leg["peak_rss_mb"] > 20
        assert leg["rss"]
        assert leg["load_after"]
    cons = next(leg for leg in engine_legs if leg["workload"] == "insert"
                and leg["label"] == "consolidated")
    assert cons["check"]["consolidated"]["delta"]["rows"] == "20000"
    report = (out / "report.md").read_text()
    assert "## insert" in report
    assert "## mixed" in report
    assert (out / "throughput.png").stat().st_size > 1000
    assert (out / "rss.png").exists()


@pytest.mark.timeout(600)
def test_a_wrong_checksum_fails_the_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _bench(out, "--workloads", "insert", "--modes", "consolidated", "--rows", "2000",
                  "--repeat", "1", "--corrupt-checksum")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] is False
    assert any("wrong result" in f for f in res["failures"])
    leg = next(leg for leg in res["legs"] if leg["leg"] == "engine")
    assert leg["ok"] is False
    assert leg["rate"] is None  # never reported as a fast result
    assert leg["check"]["consolidated"]["differences"]["sum_id"]
    assert "FAILED" in (out / "report.md").read_text()


@pytest.mark.timeout(900)
def test_a_before_build_runs_beside_this_one(tmp_path: Path) -> None:
    """`--before-python`: every backlog and snapshot leg also runs with that interpreter's
    build (here the same one), labelled `<mode>@before`, alternating, checked like the rest."""
    out = tmp_path / "results"
    done = _bench(out, "--workloads", "mixed,snapshot", "--rows", "5000", "--repeat", "2",
                  "--before-python", sys.executable)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] is True and res["settings"]["before_python"] == sys.executable
    legs = [(leg["workload"], leg["label"], leg["rep"]) for leg in res["legs"]
            if leg["leg"] == "engine"]
    mixed = [(label, rep) for w, label, rep in legs if w == "mixed"]
    # alternating: this build first in even repetitions, the before build first in odd ones
    assert [label for label, rep in mixed if rep == 0][:2] == ["consolidated",
                                                               "consolidated@before"]
    assert [label for label, rep in mixed if rep == 1][:2] == ["consolidated@before",
                                                               "consolidated"]
    figures = res["workloads"]["mixed"]["figures"]
    for mode in ("consolidated", "append"):
        assert figures[f"engine_{mode}@before"]["rate"]["n"] == 2
        assert figures[f"engine_{mode}"]["ratio_vs_before"] > 0
    snap = res["workloads"]["snapshot"]["sizes"]["5000"]
    assert snap["engine_consolidated@before"]["rate"]["n"] == 2
    assert snap["engine_consolidated"]["ratio_vs_before"] > 0
    assert "vs before" in (out / "report.md").read_text()


@pytest.mark.timeout(600)
def test_a_missed_snapshot_goal_gets_a_profile(tmp_path: Path) -> None:
    """At 3,000 rows the engine's start-up dominates, so the 0.6× COPY goal is missed: the run
    records one more, profiled snapshot and links its flame graph from the report."""
    out = tmp_path / "results"
    done = _bench(out, "--workloads", "snapshot", "--rows", "3000", "--repeat", "1", "--profile")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    snap = res["workloads"]["snapshot"]
    assert any(g["met"] is False for g in snap["goals"] if "COPY" in g["goal"]), snap["goals"]
    (name,) = snap["profiles"].values()
    assert name and (out / name).stat().st_size > 1000
    assert f"[{name}]({name})" in (out / "report.md").read_text()
