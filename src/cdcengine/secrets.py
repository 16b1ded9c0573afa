"""Keeping secrets out of every message.

Two layers, both pure functions:
- `mask_dsn(dsn)` gives a printable form of a dsn with its password replaced by `***`, for
  `status` and logs. It never raises, even on a dsn libpq itself cannot parse.
- `scrub(text, secrets)` removes known secret strings (and their percent-encoded and decoded forms)
  from any text, plus anything that looks like a URL password or a `password=` pair. Error paths
  pass driver messages through it, because libpq echoes the offending token of a malformed dsn
  (e.g. `invalid percent-encoded token: "p%zz"`).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping

MASK = "***"

# scheme://user:  -- where a URL password starts (see _url_password_spans for where it ends)
_URL_PREFIX = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:")
# password=value  or  password = 'quoted value'  (libpq key/value form)
_KV_PASSWORD = re.compile(
    r"(?P<pre>\b(?:password|passwd|pwd|secret|secret_access_key|access_key|sas_token|token)"
    r"\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)",
    re.IGNORECASE,
)


def _url_password_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every URL password in `text`, as written.

    libpq ends the userinfo at the first '@', so a raw '?' belongs to the password; a password
    typed with a raw '@', ':' or '/' (which libpq misparses) should still be hidden whole. So the
    password runs to the last '@' before the first '?' that follows the first '@' (a query value
    such as application_name=a@b is not swallowed).
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    while (m := _URL_PREFIX.search(text, pos)) is not None:
        start = m.end()
        stop = next((i for i in range(start, len(text)) if text[i].isspace()), len(text))
        first_at = text.find("@", start, stop)
        if first_at >= 0:
            query = text.find("?", first_at, stop)
            end = text.rfind("@", start, query if query >= 0 else stop)
            spans.append((start, end))
            pos = end + 1
        else:
            pos = start
    return spans


def dsn_password(dsn: str) -> str | None:
    """The password of a dsn, as written (URL or key/value form), or None. Never raises."""
    spans = _url_password_spans(dsn)
    if spans:
        start, end = spans[0]
        return dsn[start:end] or None
    m = re.search(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn, re.IGNORECASE)
    if m:
        raw = m.group(1)
        if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
            raw = raw[1:-1].replace("\\'", "'").replace("\\\\", "\\")
        return raw or None
    return None


def secret_variants(secret: str) -> set[str]:
    """The forms a secret may take in a message: as given, decoded, encoded, and quoted-token."""
    out = {secret}
    with contextlib.suppress(UnicodeDecodeError):
        out.add(urllib.parse.unquote(secret, errors="strict"))
    out.add(urllib.parse.quote(secret, safe=""))
    # libpq echoes a bad percent token by itself: "invalid percent-encoded token: "%zz..."",
    # so every suffix from a '%' onwards of the raw password is a secret too.
    for i, ch in enumerate(secret):
        if ch == "%" and len(secret) - i >= 3:
            out.add(secret[i:])
    return {s for s in out if len(s) >= 3 or s == secret}


def option_secrets(options: Mapping[str, object] | None) -> list[str]:
    """The values of storage options that may be secret, for `scrub`: flags and numbers
    (aws_conditional_put = "etag" stays, "true"/"30" are not secret) are left out."""
    return [str(v) for v in (options or {}).values()
            if len(str(v)) >= 4 and str(v).lower() not in ("true", "false")
            and not str(v).isdigit()]


#: Environment variables holding object-store credentials: delta-rs reads them when the
#: destination's options do not set the key, so their values are secrets of every object-store
#: destination (ids such as AWS_ACCESS_KEY_ID are not secret and stay readable).
CREDENTIAL_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY",
                  "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_KEY",
                  "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_TOKEN", "AZURE_STORAGE_CLIENT_SECRET",
                  "AZURE_CLIENT_SECRET", "GOOGLE_SERVICE_ACCOUNT_KEY")


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The object-store credentials set in the environment (`CREDENTIAL_ENV`), for `scrub`."""
    env = os.environ if environ is None else environ
    return [v for k in CREDENTIAL_ENV if len(v := env.get(k, "").strip()) >= 4]


# libpq's key/value form: `key = value` pairs, values bare or single-quoted (with \' escapes)
_KV_DSN = re.compile(r"\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']+)\s*)+")
_URL_DSN = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
# the hosts of a URL without userinfo: host[:port] or [v6][:port], comma-separated
_URL_HOSTS = re.compile(r"(?:(?:\[[0-9A-Fa-f:.]+\]|[^:,@\[\]/?#]*)(?::\d{0,5})?)"
                        r"(?:,(?:\[[0-9A-Fa-f:.]+\]|[^:,@\[\]/?#]*)(?::\d{0,5})?)*")
UNPARSEABLE_DSN = "*** (not a parseable dsn: hidden whole)"


def display_dsn(dsn: str) -> str:
    """A dsn fit to print in `check`, `status` and logs: its password masked, and a dsn that is
    not parseable as one masked whole. A mistyped dsn may hold the password where no password
    belongs (`postgresql://u:pw127.0.0.1/db`, the `@` forgotten, reads as host `u`, port
    `pw127…`), or be nothing but the password (`dsn = "pw"`): printing it "with the password
    masked" would print the password. Never raises."""
    if not isinstance(dsn, str):
        return UNPARSEABLE_DSN
    text = dsn.strip()
    if not text:
        return ""
    if _URL_DSN.match(text):
        rest = text[_URL_DSN.match(text).end():]  # type: ignore[union-attr]
        # libpq looks for the user's '@' up to the first '/': a raw '?' or '#' in a password is
        # still inside it; without one, what precedes '/' or '?' must be host[:port] list
        authority = rest.split("/", 1)[0]
        if "@" not in authority and not _URL_HOSTS.fullmatch(authority.split("?", 1)[0]):
            return UNPARSEABLE_DSN
        return mask_dsn(text)
    if _KV_DSN.fullmatch(text):
        return mask_dsn(text)
    return UNPARSEABLE_DSN


def mask_dsn(dsn: str) -> str:
    """A dsn fit to print: the password replaced by `***`. Never raises."""
    masked = dsn
    for start, end in reversed(_url_password_spans(dsn)):
        masked = masked[:start] + MASK + masked[end:]
    return _KV_PASSWORD.sub(lambda m: m.group("pre") + MASK, masked)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every known secret (and URL/kv passwords) replaced by `***`."""
    variants: set[str] = set()
    for s in secrets:
        if s:
            variants |= secret_variants(s)
    # longest first so a secret's suffix does not leave its head behind
    for v in sorted(variants, key=len, reverse=True):
        if v:
            text = text.replace(v, MASK)
    return mask_dsn(text)
