"""A local S3 for the tests: moto's server on 127.0.0.1, one bucket per test.

`MotoServer.start()` runs `python -m moto.server` (pip `moto[server]`, in the `test` extra) on a
free loopback port as a subprocess, its request log in a file (`requests()` reads it back: the
status of every PUT of a Delta commit shows whether a conditional put was refused), and waits
until it answers. `bucket()` creates a bucket with a fresh name through boto3. `S3Bucket.options`
are the storage options a source's `destination_options` (or deltalake) needs for it.

moto accepts any credentials; the tests use a distinctive secret key so that a leak of it into
any output can be searched for.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY_ID = "AKIACDCENGINETEST01"
SECRET_KEY = "S3cretKey-cdcengine-9f2b7d41e0"  # distinctive: searched for in every output
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
# one request line of moto's (werkzeug's) log: "PUT /bucket/key HTTP/1.1" 412
_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    status: int


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Bucket:
    name: str
    endpoint: str

    def uri(self, prefix: str = "lake") -> str:
        return f"s3://{self.name}/{prefix}"

    def options(self, *, credentials: bool = True, **extra: str) -> dict[str, str]:
        """deltalake storage options for this bucket (keys included unless `credentials` is
        False: then they come from the environment)."""
        opts = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION,
                "AWS_ALLOW_HTTP": "true"}
        if credentials:
            opts |= {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        return opts | extra

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`."""
        out: list[str] = []
        for page in client(self.endpoint).get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


def client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY_ID,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    """moto's S3 server as a subprocess (see the module docstring)."""

    endpoint: str
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @classmethod
    def start(cls, workdir: Path) -> MotoServer:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            pytest.fail("moto's S3 server is not installed: pip install -e '.[test]' "
                        "(it brings moto[server] and boto3)")
        port = free_port()
        log = workdir / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
        server = cls(endpoint=f"http://127.0.0.1:{port}", log=log, process=process)
        server._wait_ready()
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"moto server exited with {self.process.returncode}: "
                            f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"moto server did not answer on {self.endpoint} within "
                                f"{START_TIMEOUT_S:.0f} s")
                time.sleep(0.1)

    def bucket(self) -> S3Bucket:
        name = "cdc-" + uuid.uuid4().hex[:16]
        client(self.endpoint).create_bucket(Bucket=name)
        return S3Bucket(name=name, endpoint=self.endpoint)

    def requests(self, bucket: S3Bucket | None = None) -> list[Request]:
        """Every request moto logged so far (of `bucket` only, when given)."""
        text = self.log.read_text(errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # werkzeug colours error lines
        out = [Request(m["method"], m["path"], int(m["status"])) for m in _REQUEST.finditer(text)]
        if bucket is not None:
            out = [r for r in out if r.path.startswith(f"/{bucket.name}/")
                   or r.path.startswith(f"/{bucket.name}?")]
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
