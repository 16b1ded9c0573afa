"""A daemon's start: the slot monitor's first pass must not take the source's lease while the
source's first pipeline is being built (it imports the adapter, so the monitor's thread often
got there first and every start waited out its health check plus a standby poll)."""

from __future__ import annotations

import threading
from pathlib import Path

from cdcengine.config import SourceConfig
from cdcengine.serve.runner import SourceRunner


def test_a_runner_counts_as_starting_until_its_first_pipeline_exists(tmp_path: Path) -> None:
    src = SourceConfig(name="s", dsn="postgresql://u@127.0.0.1:1/d", tables=("public.t",),
                       destination=str(tmp_path / "lake"))
    runner = SourceRunner(src, f"sqlite:///{tmp_path / 'state.db'}", threading.Event())
    assert runner.starting() and not runner.holds_lease()  # the monitor only reads
    runner._launching = False  # what the first pipeline's creation (or failure) does
    assert not runner.starting()
