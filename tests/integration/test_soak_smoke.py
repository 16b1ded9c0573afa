"""A short run of the kill -9 soak runner (`tests/soak/kill9_soak.py`), so it never rots: a few
kills during the snapshot and under pgbench, then every check the long soak makes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cdcengine_postgres.testing.cluster import ClusterError, find_bindir

RUNNER = Path(__file__).resolve().parents[1] / "soak" / "kill9_soak.py"


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_the_soak_runner_passes_a_short_run(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        find_bindir()
    except ClusterError as exc:
        pytest.skip(f"needs local PostgreSQL server binaries: {exc}")
    spec = importlib.util.spec_from_file_location("kill9_soak", RUNNER)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    code = soak.main(["--kills", "5", "--snapshot-kills", "2", "--scale", "2", "--rate", "100",
                      "--seed", "3", "--catch-up-s", "120"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '"kills": 5' in out
