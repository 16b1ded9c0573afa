"""A throwaway certificate authority and a TLS-only PostgreSQL server for the TLS tests.

`make_pki` creates, with the `openssl` command line tool, everything a `sslmode=verify-full`
setup needs: a CA, a server certificate signed by it for `localhost` (plus any extra names or IP
addresses), a client certificate whose CN is a database role (for pg_hba's `cert` method), and a
second, unrelated CA whose certificate stands in for "the wrong root certificate". Elliptic-curve
keys keep the whole set under a second to make.

`tls_cluster_options` turns a `Pki` into the `TempCluster` arguments for a server with
`ssl = on` whose pg_hba.conf accepts TCP only through `hostssl` lines: the client-certificate
role with `cert`, everyone else with scram-sha-256. Nothing here talks to the engine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

#: Server-side file names inside the data directory (relative ssl_* paths resolve there).
SERVER_FILES = ("server.crt", "server.key", "ca.crt")
_DAYS = "2"


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of one test PKI; every private key is mode 0600."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_user: str
    other_ca_cert: Path  # a CA that signed nothing here: the "wrong CA"
    other_client_cert: Path  # a client certificate for `client_user` signed by the wrong CA
    other_client_key: Path

    def server_files(self) -> dict[str, bytes]:
        """What the server needs in its data directory, by the names in `SERVER_FILES`."""
        return {"server.crt": self.server_cert.read_bytes(),
                "server.key": self.server_key.read_bytes(),
                "ca.crt": self.ca_cert.read_bytes()}


def openssl_missing() -> str | None:
    """Why the PKI cannot be made here, or None."""
    if shutil.which("openssl") is None:
        return "the `openssl` command line tool is not installed (apt-get install openssl)"
    return None


def _openssl(*args: str | Path, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n{proc.stderr}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-out", path, cwd=path.parent)
    path.chmod(0o600)  # libpq and the server refuse keys that others can read


def _self_signed_ca(directory: Path, stem: str, common_name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{stem}.key", directory / f"{stem}.crt"
    _new_key(key)
    _openssl("req", "-x509", "-new", "-key", key, "-out", cert, "-days", _DAYS,
             "-subj", f"/CN={common_name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def _signed(directory: Path, stem: str, common_name: str, ca: tuple[Path, Path],
            extensions: Sequence[str]) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{stem}.key", directory / f"{stem}.csr",
                      directory / f"{stem}.crt")
    ext = directory / f"{stem}.ext"
    _new_key(key)
    ext.write_text("\n".join(extensions) + "\n")
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={common_name}",
             cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", _DAYS, "-extfile", ext, cwd=directory)
    return cert, key


def make_pki(directory: Path, *, client_user: str, server_names: Iterable[str] = ("localhost",),
             server_ips: Iterable[str] = ()) -> Pki:
    """A CA, a server certificate for `server_names`/`server_ips` (subjectAltName: libpq checks
    the host name against it under verify-full), a client certificate with CN `client_user`,
    and an unrelated second CA with a client certificate of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(server_names)
    alt = [f"DNS:{n}" for n in names] + [f"IP:{ipaddress.ip_address(i)}" for i in server_ips]
    ca = _self_signed_ca(directory, "ca", "cdcengine test CA")
    other_ca = _self_signed_ca(directory, "other-ca", "some other CA")
    server = _signed(directory, "server", names[0], ca,
                     ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth",
                      "subjectAltName=" + ",".join(alt)])
    client = _signed(directory, "client", client_user, ca,
                     ["basicConstraints=CA:FALSE", "extendedKeyUsage=clientAuth"])
    other_client = _signed(directory, "other-client", client_user, other_ca,
                           ["basicConstraints=CA:FALSE", "extendedKeyUsage=clientAuth"])
    return Pki(directory=directory, ca_cert=ca[0], server_cert=server[0], server_key=server[1],
               client_cert=client[0], client_key=client[1], client_user=client_user,
               other_ca_cert=other_ca[0], other_client_cert=other_client[0],
               other_client_key=other_client[1])


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """What `TempCluster(settings, hba=..., files=...)` (or `make_cluster`) takes."""

    settings: dict[str, str]
    hba: list[str]
    files: dict[str, bytes]


def tls_cluster_options(pki: Pki, *, addresses: Sequence[str] = ("127.0.0.1",)
                        ) -> ClusterOptions:
    """The options for a server with ssl = on, listening on `addresses`, whose TCP
    entries are all `hostssl`: `pki.client_user` must present a client certificate signed by the
    CA (`cert`), every other role a password (scram-sha-256). The unix socket stays trusted
    for the test's own set-up."""
    hba = ["local all all trust"]
    for address in addresses:
        net = ipaddress.ip_network(address)
        hba.append(f"hostssl all {pki.client_user} {net} cert")
        hba.append(f"hostssl all all {net} scram-sha-256")
    settings = {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key",
                "ssl_ca_file": "ca.crt", "listen_addresses": ",".join(addresses)}
    return ClusterOptions(settings=settings, hba=hba, files=pki.server_files())


def tls_dsn(host: str, port: int, dbname: str, *, user: str, password: str | None = None,
            **params: str | Path) -> str:
    """A URL dsn with libpq `params` (sslmode, sslrootcert, sslcert, sslkey) as query options."""
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    netloc = f"[{host}]" if ":" in host else host
    query = urlencode({k: str(v) for k, v in params.items()})
    return f"postgresql://{auth}@{netloc}:{port}/{quote(dbname, safe='')}" + (
        f"?{query}" if query else "")


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the source a "remote" dsn can
    reach this machine's server at), or None when it has none."""
    candidates: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                                     timeout=10, check=False).stdout.split()
    with contextlib.suppress(OSError):
        candidates += [str(info[4][0]) for info in
                       socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
    for text in candidates:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == 4 and not (address.is_loopback or address.is_link_local):
            return str(address)
    return None
