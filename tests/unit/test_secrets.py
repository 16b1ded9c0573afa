"""Secrets never reach a message: mask_dsn, scrub and dsn_password (SPEC §2, §4)."""

from __future__ import annotations

import urllib.parse

import pytest

from cdcengine.secrets import (
    MASK,
    UNPARSEABLE_DSN,
    display_dsn,
    dsn_password,
    mask_dsn,
    scrub,
    secret_variants,
)

# ---- mask_dsn --------------------------------------------------------------------------------


@pytest.mark.parametrize(("dsn", "masked"), [
    ("postgresql://cdc:hunter2@db:5432/shop", "postgresql://cdc:***@db:5432/shop"),
    ("postgres://cdc:hunter2@db/shop?sslmode=require",
     "postgres://cdc:***@db/shop?sslmode=require"),
    ("postgresql://cdc:hunter2@h1:5432,h2:5433/shop", "postgresql://cdc:***@h1:5432,h2:5433/shop"),
    ("postgresql://cdc:@db/shop", "postgresql://cdc:***@db/shop"),
    ("postgresql://:hunter2@db/shop", "postgresql://:***@db/shop"),
    # percent-encoded @ : % / in the password
    ("postgresql://cdc:p%40ss%3Aw%2Frd%25@db/shop", "postgresql://cdc:***@db/shop"),
    ("postgresql://cdc:p%zzword@db/shop", "postgresql://cdc:***@db/shop"),
    # written raw (a common mistake): the whole password is still hidden
    ("postgresql://cdc:p@ss@db/shop", "postgresql://cdc:***@db/shop"),
    ("postgresql://cdc:p@ss:w/rd@db/shop", "postgresql://cdc:***@db/shop"),
    ("postgresql://cdc:pa:ss@db/shop", "postgresql://cdc:***@db/shop"),
    # an '@' in the query string is not part of the password
    ("postgresql://cdc:pw@db/shop?application_name=a@b",
     "postgresql://cdc:***@db/shop?application_name=a@b"),
    ("postgresql://cdc:pw?x@db/shop?sslmode=require",
     "postgresql://cdc:***@db/shop?sslmode=require"),
    # no password: unchanged
    ("postgresql://cdc@db:5432/shop", "postgresql://cdc@db:5432/shop"),
    ("postgresql:///shop", "postgresql:///shop"),
    ("postgresql://db/shop?user=cdc", "postgresql://db/shop?user=cdc"),
    # the password as a URL query parameter
    ("postgresql://cdc@db/shop?password=hunter2&sslmode=require",
     "postgresql://cdc@db/shop?password=***"),
])
def test_mask_url_form(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize(("dsn", "masked"), [
    ("host=db user=cdc password=hunter2 dbname=shop",
     "host=db user=cdc password=*** dbname=shop"),
    ("host=db password = hunter2 dbname=shop", "host=db password = *** dbname=shop"),
    ("host=db password='a b' dbname=shop", "host=db password=*** dbname=shop"),
    ("host=db password = 'a b' dbname=shop", "host=db password = *** dbname=shop"),
    ("host=db password='it\\'s a b' dbname=shop", "host=db password=*** dbname=shop"),
    ("host=db PASSWORD=Hunter2 dbname=shop", "host=db PASSWORD=*** dbname=shop"),
    ("password=p@ss:w/rd% host=db", "password=*** host=db"),
    ("host=db dbname=shop password=hunter2", "host=db dbname=shop password=***"),
    ("host=db dbname=shop", "host=db dbname=shop"),
    ("host=db user=cdc", "host=db user=cdc"),
])
def test_mask_key_value_form(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize("dsn", ["", "x", "://", "@@@", "password=", "password='",
                                 "postgresql://:@", "a" * 10_000, "\x00", "host='unterminated"])
def test_mask_never_raises(dsn: str) -> None:
    assert isinstance(mask_dsn(dsn), str)


# ---- dsn_password ----------------------------------------------------------------------------


@pytest.mark.parametrize(("dsn", "password"), [
    ("postgresql://cdc:hunter2@db/shop", "hunter2"),
    ("postgresql://cdc:p%40ss%3Aw%2Frd%25@db/shop", "p%40ss%3Aw%2Frd%25"),  # as written
    ("postgresql://cdc:p%zzword@db/shop", "p%zzword"),
    ("postgresql://cdc:p@ss:w/rd@db/shop", "p@ss:w/rd"),
    ("postgresql://cdc@db/shop", None),
    ("postgresql://cdc:@db/shop", None),
    ("host=db password=hunter2 dbname=shop", "hunter2"),
    ("host=db password = 'a b' dbname=shop", "a b"),
    ("host=db password='it\\'s' dbname=shop", "it's"),
    ("host=db password='back\\\\slash' dbname=shop", "back\\slash"),
    ("host=db password=p@ss:w/rd%", "p@ss:w/rd%"),
    ("host=db password='' dbname=shop", None),
    ("host=db dbname=shop", None),
])
def test_dsn_password(dsn: str, password: str | None) -> None:
    assert dsn_password(dsn) == password


@pytest.mark.parametrize("garbage", [
    "", " ", "password", "password=", "password='", "password=''", "://", "://:@",
    "postgresql://", "postgresql://:@", "postgresql://u:%@h", "postgresql://u:%zz@h",
    "postgresql://u:\udcff@h", "\x00password=\x00", "'" * 50, "=" * 50, "password=" * 100,
    "postgresql://" + "u:" * 1000 + "@h", "日本:語@h",
])
def test_dsn_password_never_raises(garbage: str) -> None:
    result = dsn_password(garbage)
    assert result is None or isinstance(result, str)


# ---- scrub -----------------------------------------------------------------------------------


def test_scrub_removes_raw_decoded_and_encoded_forms() -> None:
    secret = "p%40ss w/rd"  # as written in a URL dsn; decodes to "p@ss w/rd"
    decoded = urllib.parse.unquote(secret)
    encoded = urllib.parse.quote(secret, safe="")
    assert decoded == "p@ss w/rd"
    assert encoded == "p%2540ss%20w%2Frd"
    text = f"raw {secret} | decoded {decoded} | encoded {encoded} | end"
    assert scrub(text, [secret]) == "raw *** | decoded *** | encoded *** | end"


def test_scrub_removes_the_libpq_percent_token_echo() -> None:
    dsn = "postgresql://cdc:p%zzword@db/shop"
    libpq = 'invalid connection option: invalid percent-encoded token: "%zzword"'
    out = scrub(libpq, [dsn_password(dsn) or ""])
    assert "zzword" not in out
    assert out == 'invalid connection option: invalid percent-encoded token: "***"'


def test_scrub_a_later_bad_escape() -> None:
    secret = "ab%41cd%zz99"
    out = scrub('token: "%zz99" and "%41cd%zz99" and "abAcd%zz99"', [secret])
    assert "zz99" not in out
    assert "41cd" not in out
    assert "Acd" not in out


def test_scrub_replaces_the_longest_form_first() -> None:
    # "%cdef" is a variant too; the whole secret must go, not leave "ab" behind.
    assert scrub("x ab%cdef y", ["ab%cdef"]) == "x *** y"


def test_scrub_masks_dsns_in_text_without_known_secrets() -> None:
    text = ("could not connect to postgresql://cdc:hunter2@db/shop; "
            "retrying with host=db password=hunter3 dbname=shop")
    out = scrub(text)
    assert "hunter2" not in out
    assert "hunter3" not in out
    assert out == ("could not connect to postgresql://cdc:***@db/shop; "
                   "retrying with host=db password=*** dbname=shop")


@pytest.mark.parametrize("secret", ["p@ss:w/rd%", "a b", "x'y", "ünï", "s3cr3t!"])
def test_scrub_special_characters(secret: str) -> None:
    text = f"error near {secret} and {urllib.parse.quote(secret, safe='')}"
    out = scrub(text, [secret])
    assert secret not in out
    assert urllib.parse.quote(secret, safe="") not in out
    assert out.startswith("error near ***")


def test_scrub_ignores_empty_secrets_and_keeps_other_text() -> None:
    assert scrub("nothing secret here", []) == "nothing secret here"
    assert scrub("nothing secret here", ["", ""]) == "nothing secret here"
    assert scrub("abc abc", ["abc"]) == f"{MASK} {MASK}"


def test_secret_variants() -> None:
    v = secret_variants("p%zzword")
    assert {"p%zzword", "p%25zzword", "%zzword"} <= v
    v = secret_variants("a%41b")
    assert {"a%41b", "aAb", "a%2541b", "%41b"} <= v
    # short fragments would mask unrelated text; the secret itself is always kept
    assert secret_variants("ab") >= {"ab"}
    assert "%z" not in secret_variants("xy%z")


@pytest.mark.parametrize("dsn", [
    "postgresql://u:pw127.0.0.1:5432/db",  # the '@' forgotten: "pw127.0.0.1" reads as a port
    "pw",  # nothing but the password
    "host=h Secret-pw",  # a bare word among the pairs
    "postgres://u:pw/db",
])
def test_a_dsn_that_does_not_parse_is_hidden_whole(dsn: str) -> None:
    shown = display_dsn(dsn)
    assert shown == UNPARSEABLE_DSN
    assert "pw" not in shown.replace("parseable", "")


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://h1:5432,h2:5433/db?sslmode=require",
     "postgresql://h1:5432,h2:5433/db?sslmode=require"),
    ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db"),
    ("postgresql:///db?host=/tmp", "postgresql:///db?host=/tmp"),
    ("host=h port=5432 user=u password=secret dbname=d",
     "host=h port=5432 user=u password=*** dbname=d"),
    ("host = h password = 'a b'", "host = h password = ***"),
])
def test_a_parseable_dsn_is_shown_with_its_password_masked(dsn: str, shown: str) -> None:
    assert display_dsn(dsn) == shown
