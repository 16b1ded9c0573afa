"""Classification of TLS certificate failures (adapters/postgres/tls_errors.py), on libpq's own
texts as captured from libpq 18 against a PostgreSQL 15 with ssl = on (see
tests/integration/test_tls_source.py, which runs the same cases against the real server)."""

from __future__ import annotations

import psycopg
import pytest

from cdcengine.errors import POLICY, Reason, SourceUnreachable
from cdcengine_postgres.errors import classify_postgres_error, translate_errors

CONN = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '

# name -> (libpq text after CONN, reason, words in the message, words in the fix)
CASES = {
    "wrong_ca": ("SSL error: certificate verify failed", Reason.SSL_VERIFY_FAILED,
                 ["not signed by a CA in sslrootcert"], ["sslrootcert="]),
    "wrong_host": ('server certificate for "localhost" (and 1 other name) does not match host '
                   'name "127.0.0.1"', Reason.SSL_VERIFY_FAILED,
                   ['"localhost" (and 1 other name)', 'host "127.0.0.1"'], ["subjectAltName"]),
    "wrong_host_one_name": ('server certificate for "db.example.com" does not match host name '
                            '"10.1.2.3"', Reason.SSL_VERIFY_FAILED,
                            ['for "db.example.com", not', '"10.1.2.3"'], ["subjectAltName"]),
    "missing_root_file": ('root certificate file "/root/.postgresql/root.crt" does not exist\n'
                          "Either provide the file, use the system's trusted roots with "
                          "sslrootcert=system, or change sslmode to disable server certificate "
                          "verification.", Reason.SSL_VERIFY_FAILED,
                          ['"/root/.postgresql/root.crt"', "sslrootcert"], ["sslrootcert"]),
    "root_file_not_a_cert": ('could not read root certificate file "/etc/x/client.key": no '
                             "certificate or crl found", Reason.SSL_VERIFY_FAILED,
                             ['"/etc/x/client.key"'], ["sslrootcert"]),
    "key_missing": ('certificate present, but not private key file "/etc/x/Client.KEY"',
                    Reason.SSL_VERIFY_FAILED, ['"/etc/x/Client.KEY"', "sslcert/sslkey"],
                    ["sslkey="]),
    "key_mismatch": ('could not load private key file "/etc/x/other.key": key values mismatch',
                     Reason.SSL_VERIFY_FAILED, ['"/etc/x/other.key"'], ["sslcert="]),
    "key_mode": ('private key file "/etc/x/client.key" has group or world access; file must '
                 "have permissions u=rw (0600) or less if owned by the current user, or "
                 "permissions u=rw,g=r (0640) or less if owned by root",
                 Reason.SSL_VERIFY_FAILED, ['"/etc/x/client.key"', "sslkey"],
                 ['chmod 0600 "/etc/x/client.key"']),
    "client_cert_unknown_ca": ("SSL error: tlsv1 alert unknown ca", Reason.SSL_VERIFY_FAILED,
                               ["refused our client certificate"], ["ssl_ca_file"]),
    "no_client_cert": ("FATAL:  connection requires a valid client certificate",
                       Reason.AUTH_FAILED, ["requires a client certificate"], ["sslcert="]),
    "cert_cn_not_user": ('FATAL:  certificate authentication failed for user "cdc"',
                         Reason.AUTH_FAILED, ["CN is not the database user"], ["CN"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_libpq_certificate_failures(name: str) -> None:
    text, reason, message_words, fix_words = CASES[name]
    err = classify_postgres_error(psycopg.OperationalError(CONN + text))
    assert err is not None
    assert err.reason is reason, err.message
    assert err.retryable is False and POLICY[reason].retryable is False
    assert isinstance(err, SourceUnreachable)
    for word in message_words:
        assert word in err.message, err.message
    for word in fix_words:
        assert word in err.fix, err.fix
    assert "SSL error" not in err.message  # our sentence, not libpq's


def test_a_refused_address_before_a_certificate_failure_is_not_retryable() -> None:
    """`localhost` tried at ::1 (refused) and then 127.0.0.1 (wrong CA): the definite answer
    wins, as for a password rejected after a refused address."""
    last = CONN + "SSL error: certificate verify failed"
    text = "\n".join([
        last, "Multiple connection attempts failed. All failures were:",
        "- host: 'localhost', port: '5432', hostaddr: '::1': connection failed: connection to "
        'server at "::1", port 5432 failed: Connection refused',
        f"- host: 'localhost', port: '5432', hostaddr: '127.0.0.1': {last}"])
    err = classify_postgres_error(psycopg.OperationalError(text))
    assert err is not None and err.reason is Reason.SSL_VERIFY_FAILED


def test_quoted_values_are_printable_and_short() -> None:
    path = "/tmp/" + "a" * 300 + "\x1b[31m.key"
    err = classify_postgres_error(psycopg.OperationalError(
        CONN + f'could not load private key file "{path}": key values mismatch'))
    assert err is not None and err.reason is Reason.SSL_VERIFY_FAILED
    assert "\x1b" not in err.message and "a" * 200 not in err.message
    assert "…" in err.message


def test_ssl_required_texts_keep_their_reason() -> None:
    for text in ("FATAL:  SSL is required", "server does not support SSL, but SSL was required",
                 "SSL connection has been closed unexpectedly"):
        err = classify_postgres_error(psycopg.OperationalError(CONN + text))
        assert err is not None and err.reason is not Reason.SSL_VERIFY_FAILED, text


def test_the_password_never_reaches_the_error() -> None:
    secret = "Tls-Secret-4711"
    with pytest.raises(SourceUnreachable) as info, translate_errors(secrets=[secret]):
        raise psycopg.OperationalError(
            CONN + f'could not open certificate file "/home/{secret}/c.crt": No such file')
    err = info.value
    assert err.reason is Reason.SSL_VERIFY_FAILED
    # the path is quoted for the user to find the file, but a known secret is scrubbed from
    # everything the error carries, its cause included
    assert "c.crt" in err.message
    for text in (err.message, err.fix, str(err), str(err.__cause__)):
        assert secret not in text
