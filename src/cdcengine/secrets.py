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
import re
import urllib.parse
from collections.abc import Iterable

MASK = "***"

# scheme://user:password@host...  The password runs to the *last* '@' before the query, so one
# written with a raw '@', ':' or '/' (which libpq would misparse) is still hidden whole.
_URL_USERINFO = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^\s?]*)(?=@)")
# password=value  or  password = 'quoted value'  (libpq key/value form)
_KV_PASSWORD = re.compile(
    r"(?P<pre>\b(?:password|passwd|pwd|secret|secret_access_key|access_key|sas_token|token)"
    r"\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)",
    re.IGNORECASE,
)


def dsn_password(dsn: str) -> str | None:
    """The password of a dsn, as written (URL or key/value form), or None. Never raises."""
    m = _URL_USERINFO.search(dsn)
    if m:
        return m.group("pw") or None
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


def mask_dsn(dsn: str) -> str:
    """A dsn fit to print: the password replaced by `***`. Never raises."""
    masked = _URL_USERINFO.sub(lambda m: m.group("pre") + MASK, dsn)
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
