"""The commit-safety rule for object-store destinations (`cdcengine.object_store`), the config
refusing unsafe options, and object-store credentials from the environment being secrets."""

from __future__ import annotations

import pytest

from cdcengine.config import SourceConfig
from cdcengine.errors import ConfigError
from cdcengine.object_store import CommitSafety, StorageOptionsError, storage_plan
from cdcengine.secrets import environment_secrets, scrub
from cdcengine.sink.destination import check_destination

DSN = "postgresql://cdc@db/shop"


def test_s3_gets_conditional_put_and_keeps_every_user_option() -> None:
    given = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}
    plan = storage_plan("s3://bucket/lake", given)
    assert plan.commit_safety is CommitSafety.CONDITIONAL_PUT
    assert plan.options == {**given, "aws_conditional_put": "etag"}
    assert given == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}
    assert storage_plan("S3A://bucket/lake", None).options == {"aws_conditional_put": "etag"}
    # idempotent: the plan's options plan the same
    assert storage_plan("s3://bucket/lake", plan.options) == plan
    assert plan.to_dict() == {"commit_safety": "conditional_put"}
    assert "eu-west-1" not in repr(plan)


@pytest.mark.parametrize("key", ["aws_conditional_put", "AWS_CONDITIONAL_PUT", "conditional_put"])
def test_a_users_conditional_put_is_kept_whatever_its_spelling(key: str) -> None:
    plan = storage_plan("s3://b/p", {key: "etag"})
    assert plan.options == {key: "etag"}
    assert plan.commit_safety is CommitSafety.CONDITIONAL_PUT


def test_a_dynamodb_lock_or_copy_if_not_exists_is_the_users_choice() -> None:
    lock = {"AWS_S3_LOCKING_PROVIDER": "dynamodb", "DELTA_DYNAMO_TABLE_NAME": "delta_log"}
    plan = storage_plan("s3://b/p", lock)
    assert plan.commit_safety is CommitSafety.DYNAMODB_LOCK
    assert plan.options == lock  # no conditional put added beside the lock
    copy = {"copy_if_not_exists": "header: cf-copy-destination-if-none-match: *"}
    assert storage_plan("s3://b/p", copy).commit_safety is CommitSafety.COPY_IF_NOT_EXISTS
    assert storage_plan("s3://b/p", copy).options == copy


@pytest.mark.parametrize(("options", "words"), [
    ({"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}, "AWS_S3_ALLOW_UNSAFE_RENAME"),
    ({"aws_s3_allow_unsafe_rename": "1", "aws_conditional_put": "etag"},
     "AWS_S3_ALLOW_UNSAFE_RENAME"),
    ({"aws_conditional_put": "disabled"}, "aws_conditional_put"),
    ({"AWS_S3_LOCKING_PROVIDER": "zookeeper"}, "dynamodb"),
])
def test_unsafe_s3_options_are_refused_with_the_fix(options: dict[str, str], words: str) -> None:
    with pytest.raises(StorageOptionsError) as err:
        storage_plan("s3://b/p", options)
    assert words in str(err.value)
    assert "DynamoDB" in str(err.value) or "dynamodb" in str(err.value)


def test_unsafe_rename_off_is_fine() -> None:
    plan = storage_plan("s3://b/p", {"AWS_S3_ALLOW_UNSAFE_RENAME": "false"})
    assert plan.commit_safety is CommitSafety.CONDITIONAL_PUT


@pytest.mark.parametrize(("destination", "safety"), [
    ("gs://bucket/lake", CommitSafety.NATIVE),
    ("az://container/lake", CommitSafety.NATIVE),
    ("abfss://c@account.dfs.core.windows.net/lake", CommitSafety.NATIVE),
    ("/var/lake", CommitSafety.LOCAL),
    ("file:///var/lake", CommitSafety.LOCAL),
])
def test_other_stores_pass_their_options_unchanged(destination: str, safety: CommitSafety) -> None:
    opts = {"google_service_account": "/k.json", "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    plan = storage_plan(destination, opts)
    assert plan.commit_safety is safety
    assert plan.options == opts


def test_config_refuses_unsafe_options_at_load_without_echoing_secrets() -> None:
    with pytest.raises(ConfigError) as err:
        SourceConfig(name="shop", dsn=DSN, tables=["orders"], destination="s3://b/shop",
                     destination_options={"AWS_S3_ALLOW_UNSAFE_RENAME": "true",
                                          "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-secret"})
    assert "destination_options" in err.value.message
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" in err.value.message
    assert "wJalrXUtnFEMI-secret" not in err.value.message
    # the same option under a local destination means nothing to delta-rs: accepted
    SourceConfig(name="shop", dsn=DSN, tables=["orders"], destination="/tmp/lake",
                 destination_options={"AWS_S3_ALLOW_UNSAFE_RENAME": "true"})


def test_environment_credentials_are_secrets_of_object_store_sources(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-Secret-Key-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-Session-Token-456")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEID")
    assert environment_secrets() == ["env-Secret-Key-123", "env-Session-Token-456"]
    s3 = SourceConfig(name="shop", dsn=DSN, tables=["orders"], destination="s3://b/shop")
    assert "env-Secret-Key-123" in s3.secrets()
    assert scrub("denied for env-Secret-Key-123", s3.secrets()) == "denied for ***"
    local = SourceConfig(name="shop", dsn=DSN, tables=["orders"], destination="/tmp/lake")
    assert "env-Secret-Key-123" not in local.secrets()


def test_check_names_the_commit_mechanism_of_an_object_store() -> None:
    [c] = check_destination("shop", "s3://b/shop", {"AWS_REGION": "us-east-1"})
    assert c.ok and "conditional put" in c.message
    [c] = check_destination("shop", "s3://b/shop", {"AWS_S3_LOCKING_PROVIDER": "dynamodb"})
    assert "DynamoDB" in c.message
