"""`log_format = "json"`: one JSON object per stderr line, stable event names, secrets masked —
for the engine's own events and for whatever the standard `logging` module and `warnings` emit."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from cdcengine.serve.logs import configure_logging

SECRET = "Log-Hush-8812"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # an in-process CLI run of an earlier test may have left `warnings` captured, under a
    # `catch_warnings` of pytest's that has ended since: start from a clean slate
    logging.captureWarnings(False)
    yield
    structlog.reset_defaults()
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(err: str) -> list[dict[str, object]]:
    out = []
    for line in err.splitlines():
        record = json.loads(line)  # any other line fails the test
        assert isinstance(record, dict), line
        out.append(record)
    return out


def test_json_format_writes_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", secrets=[SECRET])
    log = structlog.get_logger("cdcengine.test")
    log.info("batch_committed", source="shop", rows=3, note="line one\nline two")
    log.warning("source_reconnecting", source="shop",
                message=f"could not connect to postgresql://cdc:{SECRET}@db/shop")
    try:
        raise RuntimeError(f"driver said password={SECRET}")
    except RuntimeError:
        log.exception("source_failed", source="shop")
    log.debug("hidden_at_info")
    logging.getLogger("deltalake").warning("library warning about %s", SECRET)
    logging.getLogger("deltalake").info("library chatter")  # below WARNING: hidden
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    err = capsys.readouterr().err
    records = lines(err)
    assert [r["event"] for r in records[:3]] == ["batch_committed", "source_reconnecting",
                                                 "source_failed"]
    for r in records:
        assert {"event", "level", "timestamp"} <= set(r), r
    assert records[0]["rows"] == 3 and records[0]["level"] == "info"
    assert "RuntimeError" in str(records[2]["exception"])
    assert records[3]["logger"] == "deltalake" and records[3]["level"] == "warning"
    assert records[4]["logger"] == "py.warnings"
    assert len(records) == 5
    assert SECRET not in err


def test_configuring_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    configure_logging(fmt="json")
    logging.getLogger("lib").error("once")
    assert len(lines(capsys.readouterr().err)) == 1


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="console")
    structlog.get_logger("cdcengine.test").info("daemon_started", sources=["shop"])
    err = capsys.readouterr().err
    assert "daemon_started" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])
