"""TLS certificate failures at connect time: what libpq says, and the message and fix we give.

`errors` asks `tls_reason` for a reason before its generic SSL and network rules, and
`tls_specific` for the exact message and fix. The texts matched are libpq's (fe-secure-openssl.c;
checked with libpq 18 against PostgreSQL 15 with a CA made by the test fixture), e.g.

* `SSL error: certificate verify failed` -- the server's chain does not end at a CA in
  sslrootcert (a wrong CA, an expired or self-signed certificate);
* `server certificate for "localhost" (and 1 other name) does not match host name "127.0.0.1"`
  -- sslmode=verify-full and the dsn's host is not in the certificate;
* `root certificate file "/root/.postgresql/root.crt" does not exist` / `could not read root
  certificate file "…": no certificate or crl found` -- sslrootcert missing or not a certificate;
* `certificate present, but not private key file "…"`, `could not load private key file "…":
  key values mismatch`, `private key file "…" has group or world access` -- sslcert/sslkey;
* `SSL error: tlsv1 alert unknown ca` -- the server did not trust our client certificate;
* `FATAL:  connection requires a valid client certificate` -- pg_hba says `cert` (or
  clientcert=…) and no client certificate was sent: `auth_failed`, like a wrong password.

The message never copies libpq's sentence. It quotes only what the user wrote in the dsn and
needs to find -- the host name, the certificate's name, a file path -- each cut to a short
printable form. These are not secrets (the password never appears in these texts), and the
caller's `scrub` of secrets still applies to the chained cause.
"""

from __future__ import annotations

import re

from cdcengine.errors import Reason

__all__ = ["tls_reason", "tls_specific"]

_MAX_QUOTED = 120

# --- the server's certificate (checked by us) ------------------------------------------------
_UNTRUSTED = (
    "certificate verify failed",
    "self-signed certificate",
    "self signed certificate",
    "unable to get local issuer certificate",
    "certificate has expired",
)
_HOST_MISMATCH = re.compile(
    r'server certificate for "(?P<cert>[^"]*)"(?P<more> \(and \d+ other names?\))? does not '
    r'match host name "(?P<host>[^"]*)"', re.IGNORECASE)
_HOST_UNCHECKABLE = (
    "could not get server's host name from server certificate",
    "server certificate contains embedded null",
    "host name must be specified for a verified ssl connection",
)
_ROOT_FILE = re.compile(r'(?:could not read )?root certificate file "(?P<path>[^"]*)"',
                        re.IGNORECASE)
# --- our client certificate ----------------------------------------------------------------------
_CLIENT_FILE = re.compile(
    r'(?:certificate present, but not private key file|could not load private key file|'
    r'could not open private key file|private key file|could not open certificate file|'
    r'could not read certificate file|could not load ssl certificate file|'
    r'could not read private key file) "(?P<path>[^"]*)"', re.IGNORECASE)
_KEY_MODE = "has group or world access"
_CLIENT_REFUSED = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert certificate expired",
    "alert certificate revoked",
    "alert unsupported certificate",
    "alert certificate required",
)
_CLIENT_CERT_REQUIRED = ("connection requires a valid client certificate",
                         "certificate authentication failed for user")

_ROOT_FIX = ("Set sslrootcert in the dsn to the CA certificate (PEM) that signed the server's "
             "certificate -- the server's CA, or your provider's CA bundle on a managed "
             "service -- or sslrootcert=system when a public CA signed it.")
_CLIENT_FIX = ("Give the dsn sslcert= a client certificate signed by the CA in the server's "
               "ssl_ca_file and sslkey= its own private key (PEM, mode 0600); with pg_hba "
               "`cert` its CN must be the database user.")


def tls_reason(text: str) -> Reason | None:
    """The reason for a lower-cased libpq connect error about TLS certificates, or None."""
    if any(m in text for m in _CLIENT_CERT_REQUIRED):
        return Reason.AUTH_FAILED
    if (any(m in text for m in _UNTRUSTED) or _HOST_MISMATCH.search(text)
            or any(m in text for m in _HOST_UNCHECKABLE) or _ROOT_FILE.search(text)
            or _CLIENT_FILE.search(text) or any(m in text for m in _CLIENT_REFUSED)):
        return Reason.SSL_VERIFY_FAILED
    return None


def _quoted(value: str) -> str:
    """`value` as shown in a message: printable characters only, at most 120 of them."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in value)
    if len(clean) > _MAX_QUOTED:
        clean = clean[: _MAX_QUOTED - 1] + "…"
    return f'"{clean}"'


def tls_specific(reason: Reason, raw: str) -> tuple[str, str] | None:
    """(message, fix) for a TLS certificate failure whose libpq text is `raw` (original case:
    paths are case-sensitive), or None when `raw` is not one."""
    text = raw.lower()
    if reason is Reason.AUTH_FAILED and any(m in text for m in _CLIENT_CERT_REQUIRED):
        return ("The server requires a client certificate for this user (pg_hba.conf `cert` or "
                "clientcert=verify-full), and none was sent or its CN is not the database "
                "user.", _CLIENT_FIX)
    if reason is not Reason.SSL_VERIFY_FAILED:
        return None
    if m := _HOST_MISMATCH.search(raw.replace("\n", " ")):
        more = m.group("more") or ""
        return (f"The server's TLS certificate is for {_quoted(m.group('cert'))}{more}, not "
                f"for the dsn's host {_quoted(m.group('host'))} (sslmode=verify-full checks "
                "the host name).",
                "Connect with a host name the certificate lists in its subjectAltName, or have "
                "the server certificate reissued with this host name in it. (sslmode=verify-ca "
                "skips the name check, which lets any holder of a certificate from that CA "
                "impersonate the server.)")
    if any(m in text for m in _HOST_UNCHECKABLE):
        return ("The server's TLS certificate names no host that sslmode=verify-full could "
                "check against the dsn's host.",
                "Have the server certificate reissued with the server's host name in its "
                "subjectAltName, and use that name as the dsn's host.")
    if _KEY_MODE in text and (m := _CLIENT_FILE.search(raw)):
        return (f"The client key file {_quoted(m.group('path'))} (sslkey) can be read by other "
                "users, so libpq refuses it.",
                f"chmod 0600 {_quoted(m.group('path'))} (owned by the user the engine runs "
                "as).")
    if m := _CLIENT_FILE.search(raw):
        return (f"The client certificate or key {_quoted(m.group('path'))} (sslcert/sslkey) "
                "is missing, unreadable, or the key does not belong to the certificate.",
                _CLIENT_FIX)
    if m := _ROOT_FILE.search(raw):
        return (f"The root certificate file {_quoted(m.group('path'))} (sslrootcert) does not "
                "exist or holds no certificate.", _ROOT_FIX)
    if any(m in text for m in _CLIENT_REFUSED):
        return ("The server refused our client certificate in the TLS handshake (not signed by "
                "a CA in its ssl_ca_file, or expired).", _CLIENT_FIX)
    if any(m in text for m in _UNTRUSTED):
        return ("The server's TLS certificate is not signed by a CA in sslrootcert, or has "
                "expired (certificate verify failed).", _ROOT_FIX)
    return None
