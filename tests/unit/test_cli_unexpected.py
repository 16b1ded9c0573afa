"""The CLI's last word on an unexpected error: a reason, `-v` details, and never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from cdcengine import api
from cdcengine.serve.cli import main as cli

SECRET = "Hush-Unexp-5521"


@pytest.fixture(autouse=True)
def _restore_structlog():
    """cli.main configures structlog process-wide, onto pytest's captured stderr."""
    yield
    structlog.reset_defaults()


def test_unexpected_error_is_reported_with_details_under_verbose_and_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cdcengine.toml"
    cfg.write_text(
        "[[source]]\nname = \"shop\"\n"
        f"dsn = \"postgresql://u:{SECRET}@127.0.0.1:1/db\"\n"
        "tables = [\"orders\"]\ndestination = \"./lake\"\n"
        f"[engine]\nstate = \"sqlite:///{tmp_path}/s.db\"\n")

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError(f"driver said: postgresql://u:{SECRET}@127.0.0.1:1/db")

    monkeypatch.setattr(api, "discover_tables", boom)
    assert cli.main(["--config", str(cfg), "-v", "tables"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "unknown:" in err
    assert "RuntimeError" in err
    assert "cli_unexpected_error" in err  # the -v details (traceback) were logged
    assert "Traceback" in err
    assert SECRET not in err


def test_snapshot_progress_line() -> None:
    from cdcengine.serve.cli.main import _snapshot_progress

    line = _snapshot_progress({"rows": 120_000, "rows_total": 1_000_000, "rows_per_s": 50_000.4,
                               "chunks_done": 3, "chunks_total": 10, "eta_s": 17.6})
    assert line == "120,000 of ~1,000,000 rows, 50,000 rows/s, chunks 3/10, ETA 18 s"
    assert _snapshot_progress({}).endswith("ETA -")
