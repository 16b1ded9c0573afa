"""`check` of a local destination: writable, a directory, only the engine's Delta tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdcengine.sink.destination import check_destination, foreign_entries
from cdcengine.source.adapter import Severity


def _one(checks: list) -> object:  # type: ignore[type-arg]
    assert len(checks) == 1, checks
    return checks[0]


def test_a_new_destination_under_a_writable_directory_is_fine(tmp_path: Path) -> None:
    check = _one(check_destination("shop", str(tmp_path / "lake" / "shop")))
    assert check.severity is Severity.OK and "writable" in check.message
    assert not (tmp_path / "lake").exists()  # check changes nothing


def test_a_destination_holding_the_engines_tables_is_fine(tmp_path: Path) -> None:
    (tmp_path / "public" / "orders" / "_delta_log").mkdir(parents=True)
    (tmp_path / "public" / "orders_cdc" / "_delta_log").mkdir(parents=True)
    (tmp_path / "_cdcengine_staging" / "x").mkdir(parents=True)
    check = _one(check_destination("shop", str(tmp_path)))
    assert check.severity is Severity.OK and "2 Delta table(s)" in check.message


def test_a_folder_of_someone_elses_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "report.csv").write_text("a,b\n")
    (tmp_path / "public" / "orders").mkdir(parents=True)
    (tmp_path / "public" / "orders" / "part-0.parquet").write_bytes(b"x")
    assert foreign_entries(tmp_path) == ["public/orders", "report.csv"]
    check = _one(check_destination("shop", str(tmp_path)))
    assert check.severity is Severity.ERROR
    assert "report.csv" in check.message and "empty or new directory" in check.fix


def test_a_file_is_not_a_destination(tmp_path: Path) -> None:
    f = tmp_path / "lake"
    f.write_text("")
    check = _one(check_destination("shop", str(f)))
    assert check.severity is Severity.ERROR and "is a file" in check.message


@pytest.mark.parametrize("path", ["/proc/cdcengine-lake", "/proc/self/lake"])
def test_a_place_nobody_can_write_is_refused_with_the_reason(path: str) -> None:
    check = _one(check_destination("shop", path))
    assert check.severity is Severity.ERROR
    assert "cannot write to destination" in check.message and "chown" in check.fix


def test_an_object_store_is_not_probed(tmp_path: Path) -> None:
    check = _one(check_destination("shop", "s3://bucket/lake"))
    assert check.severity is Severity.OK and "not probed" in check.message
