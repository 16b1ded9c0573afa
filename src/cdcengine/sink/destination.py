"""`check` of a source's destination (SPEC §3): can the engine write its Delta tables there?

A local destination is probed without changing it: it must be a directory (or not exist yet,
under a directory the engine can create it in), writable, on a file system that is not
read-only, with room to spare, and hold nothing but the engine's own Delta tables. A folder of
the user's files is refused rather than mixed with Delta tables. Object-store destinations
(s3://, gs://, az://, …) are not probed here: their credentials and conditional writes are the
object store's business, and the first write reports them.

Pure file-system code: no deltalake (a Delta table is recognised by its `_delta_log` folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cdcengine.object_store import CommitSafety, StorageOptionsError, storage_plan
from cdcengine.source.adapter import Check, Severity

__all__ = ["LOW_SPACE_BYTES", "check_destination", "foreign_entries", "local_path"]

#: Below this much free space `check` warns: snapshots write whole tables at once.
LOW_SPACE_BYTES: Final = 1024**3
_DELTA_LOG: Final = "_delta_log"
_STAGING: Final = "_cdcengine_staging"  # resync's staging area (cdcengine.pipeline.resync.STAGING)
_NAME: Final = "destination"


def local_path(destination: str) -> Path | None:
    """The local directory of a destination, or None for an object store URL."""
    if destination.startswith("file://"):
        return Path(destination.removeprefix("file://"))
    if "://" in destination:
        return None
    return Path(destination)


def foreign_entries(root: Path, *, limit: int = 5) -> list[str]:
    """Entries under a destination that are not the engine's: the engine writes
    `root/schema/table[_cdc]` Delta tables (and a staging area); anything else is someone's.
    Empty folders are allowed (a table being created). At most `limit` names."""
    found: list[str] = []
    try:
        top = sorted(root.iterdir())
    except OSError:
        return found
    for schema in top:
        if schema.name == _STAGING:
            continue
        if not schema.is_dir():
            found.append(schema.name)
        else:
            try:
                tables = sorted(schema.iterdir())
            except OSError:
                continue
            for table in tables:
                if not table.is_dir() or not _is_table_dir(table):
                    found.append(f"{schema.name}/{table.name}")
        if len(found) >= limit:
            break
    return found[:limit]


def _is_table_dir(path: Path) -> bool:
    """A Delta table folder (it has a log), or an empty one (a table being created)."""
    if (path / _DELTA_LOG).is_dir():
        return True
    try:
        return next(path.iterdir(), None) is None
    except OSError:
        return False


_SAFETY_TEXT: Final = {
    CommitSafety.CONDITIONAL_PUT: "S3 conditional put (If-None-Match)",
    CommitSafety.DYNAMODB_LOCK: "the DynamoDB commit lock",
    CommitSafety.COPY_IF_NOT_EXISTS: "the store's copy-if-not-exists",
    CommitSafety.NATIVE: "the store's own conditional create",
}


def check_destination(
    source_name: str, destination: str, options: Mapping[str, str] | None = None
) -> list[Check]:
    """The destination's checks (see the module docstring); never raises."""
    root = local_path(destination)
    if root is None:
        try:
            safety = _SAFETY_TEXT.get(storage_plan(destination, options).commit_safety)
        except StorageOptionsError:  # refused when the config was loaded; not reached
            safety = None
        commits = f"; concurrent commits are kept apart by {safety}" if safety else ""
        return [Check(name=_NAME, severity=Severity.OK,
                      message=f"destination {destination} is an object store: not probed by "
                              "check (credentials and writes are verified by the first write)"
                              + commits)]
    if root.exists() and not root.is_dir():
        return [Check(name=_NAME, severity=Severity.ERROR,
                      message=f"destination {root} is a file, not a directory",
                      fix=f"point destination of source {source_name} at a directory")]
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = _unwritable(existing)
    if problem:
        where = root if existing == root else f"{existing} (where {root} would be created)"
        return [Check(name=_NAME, severity=Severity.ERROR,
                      message=f"cannot write to destination {where}: {problem}",
                      fix=f"give the engine's user write access there (chown/chmod), or point "
                          f"destination of source {source_name} elsewhere")]
    out: list[Check] = []
    foreign = foreign_entries(root) if root.is_dir() else []
    if foreign:
        out.append(Check(
            name=_NAME, severity=Severity.ERROR,
            message=f"destination {root} holds files that are not the engine's Delta tables "
                    f"({', '.join(foreign)}): the engine does not mix its tables into other "
                    "files",
            fix=f"point destination of source {source_name} at an empty or new directory "
                "(or move those files away)"))
    free = shutil.disk_usage(existing).free
    if free < LOW_SPACE_BYTES:
        out.append(Check(
            name=_NAME, severity=Severity.WARNING,
            message=f"destination {root}: only {free / 1024**2:.0f} MB free; snapshots write "
                    "whole tables and a full disk stops every write",
            fix="free space there, or point destination at a larger volume"))
    if not out:
        state = "empty or new" if not foreign and not any(_tables(root)) else \
            f"{len(list(_tables(root)))} Delta table(s)"
        out.append(Check(name=_NAME, severity=Severity.OK,
                         message=f"destination {root} is writable ({free / 1024**3:.1f} GB "
                                 f"free; {state})"))
    return out


def _tables(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p.parent for p in root.glob(f"*/*/{_DELTA_LOG}") if p.is_dir()]


def _unwritable(path: Path) -> str | None:
    """Why `path` (an existing directory) cannot be written to, or None."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "the file system is read-only"
    except (OSError, AttributeError):
        pass
    if not path.is_dir():
        return f"{path} is not a directory"
    # a real probe: access(2) says yes to root everywhere, and knows nothing of /proc and such
    try:
        fd, name = tempfile.mkstemp(prefix=".cdcengine-probe-", dir=path)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(name)
    return None
