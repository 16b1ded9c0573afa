"""Object-store destinations: the storage options the engine hands delta-rs, and its rule for
safe Delta commits.

A Delta commit is "create `_delta_log/<version>.json` unless it exists". Two writers that read
the same version both try to create the next one; exactly one may win, the other must see the
conflict and retry on top of the winner (delta-rs does that: it re-reads the log and checks
whether the winner's changes conflict with its own). Local file systems, GCS and Azure create
a file exclusively by themselves. S3 needs help, in one of two ways:

- **conditional put** (`aws_conditional_put = "etag"`): the commit is a PUT with
  `If-None-Match: *`, which S3 refuses with 412 when the object exists (AWS S3 since 2024, MinIO,
  Cloudflare R2, moto's server; an S3 clone that ignores the header is NOT safe this way);
- **a DynamoDB lock** (`AWS_S3_LOCKING_PROVIDER = "dynamodb"`, `DELTA_DYNAMO_TABLE_NAME`): a
  conditional write of the commit's entry to a DynamoDB table serialises the commits.

The engine's rule (`storage_options`): an `s3://` / `s3a://` destination gets
`aws_conditional_put = "etag"` unless the user chose a mechanism (a DynamoDB lock, or a
`copy_if_not_exists` mode for stores that offer that instead). Setting it explicitly matters:
an environment variable `AWS_CONDITIONAL_PUT=disabled` would otherwise switch it off for every
table (delta-rs reads AWS_* variables when an option is absent), and deltalake 1.6.6 then
fails every commit rather than falling back. Options that ask for an unsafe commit are refused
with the fix: `AWS_S3_ALLOW_UNSAFE_RENAME` (unsynchronised renames: the delta-rs escape hatch
for a single writer, which the engine cannot promise: `resync`, a second daemon after a lease
expiry and table maintenance may all write one table) and `aws_conditional_put = "disabled"`
without a lock (other values go to delta-rs as given: it names the ones it does not know).

Pure: no deltalake, no I/O; the Delta sink (`cdcengine.sink.delta`) applies it to every handle
it opens, and configuration validation calls it so a bad option fails at load time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["CommitSafety", "StorageOptionsError", "StoragePlan", "is_s3", "storage_plan"]

S3_SCHEMES: Final = ("s3://", "s3a://")
# the object stores whose conditional create is native (delta-rs needs no option for it)
_NATIVE_SCHEMES: Final = ("gs://", "gcs://", "az://", "abfs://", "abfss://", "adl://",
                          "azure://", "memory://")
CONDITIONAL_PUT: Final = "aws_conditional_put"
_CONDITIONAL_PUT_KEYS: Final = ("aws_conditional_put", "conditional_put")
_COPY_IF_NOT_EXISTS_KEYS: Final = ("aws_copy_if_not_exists", "copy_if_not_exists")
_LOCKING_PROVIDER: Final = "aws_s3_locking_provider"
_UNSAFE_RENAME: Final = "aws_s3_allow_unsafe_rename"
_TRUTHY: Final = ("1", "true", "yes", "on")


class CommitSafety(enum.StrEnum):
    """How two writers of one Delta table are kept from both winning a version."""

    LOCAL = "local"  # the file system's exclusive create (local paths, file://)
    NATIVE = "native"  # the object store's own conditional create (GCS, Azure)
    CONDITIONAL_PUT = "conditional_put"  # S3: PUT with If-None-Match
    DYNAMODB_LOCK = "dynamodb_lock"  # S3: delta-rs's DynamoDB commit lock
    COPY_IF_NOT_EXISTS = "copy_if_not_exists"  # S3 clones: the user's copy-if-not-exists mode


class StorageOptionsError(ValueError):
    """Options that would let two writers both win a Delta version; the text says the fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoragePlan:
    """The options to hand delta-rs (secrets inside: never printed) and the commit mechanism."""

    options: Mapping[str, str] = field(repr=False)
    commit_safety: CommitSafety

    def to_dict(self) -> dict[str, str]:
        """JSON-safe and secret-free: the mechanism only."""
        return {"commit_safety": str(self.commit_safety)}


def is_s3(destination: str) -> bool:
    """Whether `destination` is an S3 (or S3-compatible) URI."""
    return destination.strip().lower().startswith(S3_SCHEMES)


def _value(options: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    """The value of the first of `keys` present, keys compared case-insensitively (delta-rs
    lower-cases option names, so `AWS_CONDITIONAL_PUT` and `aws_conditional_put` are one)."""
    for k, v in options.items():
        if k.strip().lower() in keys:
            return str(v).strip()
    return None


def storage_plan(destination: str, options: Mapping[str, str] | None) -> StoragePlan:
    """The engine's options for `destination` (see the module docstring).

    Never drops a user's option; adds `aws_conditional_put = "etag"` to an S3 destination that
    names no commit mechanism. Raises `StorageOptionsError` for options that allow an unsafe
    commit. Idempotent: a plan's options give the same plan again.
    """
    opts = {str(k): str(v) for k, v in (options or {}).items()}
    text = destination.strip().lower()
    if not is_s3(text):
        safety = CommitSafety.NATIVE if text.startswith(_NATIVE_SCHEMES) else CommitSafety.LOCAL
        return StoragePlan(options=opts, commit_safety=safety)
    unsafe = _value(opts, (_UNSAFE_RENAME,))
    if unsafe is not None and unsafe.lower() in _TRUTHY:
        raise StorageOptionsError(
            "AWS_S3_ALLOW_UNSAFE_RENAME lets two writers of one Delta table both win a "
            "version (lost commits); the engine commits to S3 only with conditional put or a "
            "DynamoDB lock. Remove it: conditional put (aws_conditional_put = \"etag\") is "
            "used by default, or set AWS_S3_LOCKING_PROVIDER = \"dynamodb\" and "
            "DELTA_DYNAMO_TABLE_NAME for a store without If-None-Match")
    locking = _value(opts, (_LOCKING_PROVIDER,))
    if locking is not None and locking.lower() == "dynamodb":
        return StoragePlan(options=opts, commit_safety=CommitSafety.DYNAMODB_LOCK)
    if locking:
        raise StorageOptionsError(
            f"AWS_S3_LOCKING_PROVIDER must be \"dynamodb\" (the only lock delta-rs has), got "
            f"{locking!r}; or remove it to commit with conditional put")
    if _value(opts, _COPY_IF_NOT_EXISTS_KEYS):
        return StoragePlan(options=opts, commit_safety=CommitSafety.COPY_IF_NOT_EXISTS)
    put = _value(opts, _CONDITIONAL_PUT_KEYS)
    if put is None:
        opts[CONDITIONAL_PUT] = "etag"
    elif put.lower() == "disabled":
        raise StorageOptionsError(
            f"aws_conditional_put = {put!r} turns off the conditional put that keeps two "
            "writers from both committing a Delta version (deltalake then refuses every "
            "commit). Remove it (the engine sets \"etag\"), or use a DynamoDB lock: "
            "AWS_S3_LOCKING_PROVIDER = \"dynamodb\" and DELTA_DYNAMO_TABLE_NAME")
    return StoragePlan(options=opts, commit_safety=CommitSafety.CONDITIONAL_PUT)
