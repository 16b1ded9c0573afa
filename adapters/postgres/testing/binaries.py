"""Finding the machine's PostgreSQL server binaries (initdb, pg_ctl, postgres) for a throwaway
cluster, and the error every throwaway-cluster failure is reported as."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

__all__ = ["INSTALL_HINT", "MIN_MAJOR", "ClusterError", "bindir_major", "find_bindir"]

INSTALL_HINT: Final = (
    "install the PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`), "
    "or point env CDCENGINE_PG_BINDIR at the directory holding initdb/pg_ctl/postgres"
)
MIN_MAJOR: Final = 13  # DROP DATABASE ... WITH (FORCE), pg_basebackup -R writing auto.conf


class ClusterError(RuntimeError):
    """A throwaway cluster could not be found, created, started or stopped.

    The message says what to do (install hint, offending directory, tail of the server log).
    """


def _has_initdb(bindir: Path) -> bool:
    return os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "pg_ctl", os.X_OK)


def _major_of_bindir(path: Path) -> int:
    # /usr/lib/postgresql/<N>/bin
    try:
        return int(path.parent.name)
    except ValueError:
        return -1


def find_bindir() -> Path:
    """Locate the PostgreSQL server binaries (initdb, pg_ctl, postgres).

    Order: env CDCENGINE_PG_BINDIR (must be right if set: a wrong explicit setting is an error,
    not something to silently route around), `pg_config --bindir` if it holds initdb, initdb on
    PATH, then the highest Debian-style /usr/lib/postgresql/<N>/bin with N >= 13.
    """
    explicit = os.environ.get("CDCENGINE_PG_BINDIR")
    if explicit:
        path = Path(explicit)
        if _has_initdb(path):
            return path
        raise ClusterError(
            f"CDCENGINE_PG_BINDIR={explicit!r} holds no executable initdb/pg_ctl; {INSTALL_HINT}"
        )

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_initdb(Path(out)):
                return Path(out)

    initdb = shutil.which("initdb")
    if initdb:
        path = Path(initdb).resolve().parent
        if _has_initdb(path):
            return path

    candidates = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if _major_of_bindir(p) >= MIN_MAJOR and _has_initdb(p)
    ]
    if candidates:
        return max(candidates, key=_major_of_bindir)
    raise ClusterError(f"no PostgreSQL server binaries (initdb) found; {INSTALL_HINT}")


def bindir_major(bindir: Path) -> int:
    """The major version of the binaries in `bindir`, or -1 when it cannot be told."""
    version_file = bindir.parent / "PG_VERSION"  # not always present; Debian layout below
    if version_file.exists():
        with contextlib.suppress(ValueError, OSError):
            return int(version_file.read_text().split(".")[0])
    return _major_of_bindir(bindir)
