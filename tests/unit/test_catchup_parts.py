"""The catch-up path's pure parts: the binary COPY parser and the chunk policy (issue 15)."""

from __future__ import annotations

import struct

import pytest

from cdcengine.config import SourceConfig
from cdcengine.errors import ConfigError
from cdcengine_postgres.replication.catchup import MB, SlotPosition, chunk_end, should_catch_up
from cdcengine_postgres.replication.peek import SIGNATURE, CopyRows


def copy_stream(values: list[bytes], ext: bytes = b"") -> bytes:
    out = SIGNATURE + struct.pack(">ii", 0, len(ext)) + ext
    for v in values:
        out += struct.pack(">hi", 1, len(v)) + v
    return out + struct.pack(">h", -1)


VALUES = [b"B" + bytes(20), b"I\x00\x00@\x00N" + b"x" * 300, b"", b"C" * 26]


def test_copy_rows_one_frame_per_row_as_postgres_sends_them() -> None:
    data = copy_stream(VALUES)
    header = len(SIGNATURE) + 8
    frames = [data[:header + 6 + len(VALUES[0])]]  # the header travels with the first row
    pos = len(frames[0])
    for v in VALUES[1:]:
        frames.append(data[pos:pos + 6 + len(v)])
        pos += 6 + len(v)
    frames.append(data[pos:])
    assert frames[-1] == b"\xff\xff"
    parser, out = CopyRows(), []
    for f in frames:
        parser.feed(memoryview(f), out)
    assert out == VALUES and parser.ended and parser.rows == len(VALUES)


@pytest.mark.parametrize("size", [1, 2, 5, 7, 19, 64, 10_000])
def test_copy_rows_any_framing_and_header_extension(size: int) -> None:
    data = copy_stream(VALUES, ext=b"\x00\x01\x02")
    parser, out = CopyRows(), []
    for i in range(0, len(data), size):
        parser.feed(data[i:i + size], out)
    assert out == VALUES and parser.ended


def test_copy_rows_refuses_what_is_not_one_bytea_column() -> None:
    with pytest.raises(ValueError, match="signature"):
        CopyRows().feed(b"PGCOPY\nXXXXXXXXXXXXXXXXXXXXXXX", [])
    two = SIGNATURE + struct.pack(">ii", 0, 0) + struct.pack(">hi", 2, 1) + b"x"
    with pytest.raises(ValueError, match="2 columns"):
        CopyRows().feed(two, [])
    null = SIGNATURE + struct.pack(">ii", 0, 0) + struct.pack(">hi", 1, -1)
    with pytest.raises(ValueError, match="NULL"):
        CopyRows().feed(null, [])
    after = copy_stream([b"x"]) + b"\x00\x01"
    with pytest.raises(ValueError, match="after the trailer"):
        CopyRows().feed(after, [])


def test_chunk_end_is_large_never_past_the_wal_and_outgrows_the_reread() -> None:
    # plenty of WAL: one chunk's worth past the confirmed position
    assert chunk_end(SlotPosition(1000 * MB, 1000 * MB, 5000 * MB), 256 * MB) == 1256 * MB
    # the tip is nearer: up to the flushed WAL, not beyond
    assert chunk_end(SlotPosition(1000 * MB, 1000 * MB, 1100 * MB), 256 * MB) == 1100 * MB
    # a long-open transaction holds restart_lsn 900 MB back: the chunk covers as much again,
    # so what is decoded twice stays a bounded share of the work
    assert chunk_end(SlotPosition(1000 * MB, 100 * MB, 5000 * MB), 256 * MB) == 1900 * MB


def test_should_catch_up_threshold() -> None:
    assert should_catch_up(64 * MB, 64)
    assert not should_catch_up(64 * MB - 1, 64)
    assert not should_catch_up(10**15, 0)  # 0: always stream
    assert SlotPosition(10, 5, None).lag == 0  # a standby: no catch-up


def test_catchup_keys_are_validated() -> None:
    def source(**kw: object) -> SourceConfig:
        return SourceConfig(name="s", dsn="postgresql://u@h/db", tables=["t"],
                            destination="/tmp/lake", **kw)  # type: ignore[arg-type]
    default = source()
    assert (default.catchup_threshold_mb, default.catchup_chunk_mb) == (64, 256)
    assert source(catchup_threshold_mb=0).catchup_threshold_mb == 0
    with pytest.raises(ConfigError, match="catchup_threshold_mb"):
        source(catchup_threshold_mb=-1)
    with pytest.raises(ConfigError, match="catchup_chunk_mb"):
        source(catchup_chunk_mb=0)
