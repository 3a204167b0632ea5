"""docker/: the entrypoint run for real (outside Docker), and the images, compose file, proxy,
Prometheus, Grafana and Kubernetes files checked against the real serve options, ports,
probes and metric names, since no Docker engine or cluster runs them here."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
ENV_PREFIX = "ADAPTER_SERVER_"


# ---------------------------------------------------------------- entrypoint

def run_entrypoint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def printed(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, ADAPTER_SERVER_* settings) that `--print-command` reports."""
    r = run_entrypoint("--print-command", *args, env=env)
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.splitlines()
    return shlex.split(first), dict(line.split("=", 1) for line in rest)


def test_entrypoint_runs_serve_by_default_and_passes_flags():
    assert printed()[0] == ["adapter-server", "serve"]
    assert printed("--port", "9000", "--max-batch", "4")[0] == [
        "adapter-server", "serve", "--port", "9000", "--max-batch", "4"]


def test_entrypoint_runs_other_subcommands():
    assert printed("adapters", "list")[0] == ["adapter-server", "adapters", "list"]


def test_entrypoint_passes_settings_through_and_hides_the_token(tmp_path):
    env = {"ADAPTER_SERVER_PORT": "9001", "ADAPTER_SERVER_STORE": str(tmp_path / "store"),
           "ADAPTER_SERVER_ADMIN_TOKEN": "s3cret-token", "UNRELATED": "x"}
    _, settings = printed(env=env)
    assert settings == {"ADAPTER_SERVER_PORT": "9001", "ADAPTER_SERVER_STORE": str(tmp_path / "store"),
                        "ADAPTER_SERVER_ADMIN_TOKEN": "<redacted, 12 characters>"}


def test_entrypoint_reads_the_admin_token_from_a_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("abcdef\n")   # as `echo` or a Kubernetes secret writes it
    _, settings = printed(env={"ADAPTER_SERVER_ADMIN_TOKEN_FILE": str(secret)})
    assert settings == {"ADAPTER_SERVER_ADMIN_TOKEN": "<redacted, 6 characters>"}


@pytest.mark.parametrize("case", ["empty", "missing", "both"])
def test_entrypoint_refuses_a_bad_token_file(tmp_path, case):
    secret = tmp_path / "token"
    env = {"ADAPTER_SERVER_ADMIN_TOKEN_FILE": str(secret)}
    if case == "empty":
        secret.write_text("\n")
    elif case == "both":
        secret.write_text("abc")
        env["ADAPTER_SERVER_ADMIN_TOKEN"] = "def"
    r = run_entrypoint("--print-command", env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert "ADAPTER_SERVER_ADMIN_TOKEN" in r.stderr


def test_entrypoint_refuses_a_store_that_is_not_a_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_entrypoint("--print-command", env={"ADAPTER_SERVER_STORE": str(blocker / "store")})
    assert r.returncode == 2
    assert f"adapter store {blocker / 'store'}" in r.stderr and "not a directory writable" in r.stderr


# ---------------------------------------------------------------- serve options

def serve_parser(env: dict[str, str] | None = None):
    """The real `serve` parser, built under `env` (serve takes its defaults from ADAPTER_SERVER_*)."""
    import argparse
    from unittest import mock

    from server import serve

    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True):
        parser = argparse.ArgumentParser(prog="adapter-server")
        serve.register(parser.add_subparsers(dest="command"))
    return parser


def serve_env_names() -> set[str]:
    from server.serve import env_name

    serve = serve_parser()._subparsers._group_actions[0].choices["serve"]
    return {env_name(a.option_strings[-1]) for a in serve._actions if a.option_strings[-1] != "--help"}


# Variables that are real but not serve options: the default-model cache (model/default_model.py)
# and the entrypoint's token file.
OTHER_ENV = {"ADAPTER_SERVER_CACHE", "ADAPTER_SERVER_ADMIN_TOKEN_FILE"}


def assert_real_settings(names, where: str) -> None:
    unknown = {n for n in names if n.startswith(ENV_PREFIX)} - serve_env_names() - OTHER_ENV
    assert not unknown, f"{where} sets variables no code reads: {sorted(unknown)}"


def test_entrypoint_settings_reach_serve_as_options(tmp_path):
    """The whole chain: container env → entrypoint → the serve parser's values."""
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    env = {"ADAPTER_SERVER_PORT": "9100", "ADAPTER_SERVER_MAX_BATCH": "3",
           "ADAPTER_SERVER_STORE": str(tmp_path / "store"), "ADAPTER_SERVER_COMPILE": "false",
           "ADAPTER_SERVER_ADMIN_TOKEN_FILE": str(token_file)}
    command, settings = printed("--max-batch", "5", env=env)
    # What the entrypoint exports is what serve sees; the redacted token is checked separately.
    exported = {**settings, "ADAPTER_SERVER_ADMIN_TOKEN": "tok-123"}
    args = serve_parser(exported).parse_args(command[1:])
    assert (args.command, args.port, args.max_batch, args.store, args.compile, args.admin_token) == (
        "serve", 9100, 5, str(tmp_path / "store"), False, "tok-123")   # the flag beat the variable


def test_entrypoint_execs_a_server_configured_only_by_environment(tmp_path, tiny_model_dir):
    """The exec path for real: a server started by the entrypoint from ADAPTER_SERVER_* variables
    (token from a file) passes the images' HEALTHCHECK command, and SIGTERM reaches the server
    itself (exec, no shell in between) for a clean exit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    console_script = bin_dir / "adapter-server"    # what `pip install` generates
    console_script.write_text(f"#!{sys.executable}\nimport sys\nfrom server.cli import main\nsys.exit(main())\n")
    console_script.chmod(0o755)
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(ROOT),
               ADAPTER_SERVER_MODEL=str(tiny_model_dir), ADAPTER_SERVER_HOST="127.0.0.1",
               ADAPTER_SERVER_PORT=str(port), ADAPTER_SERVER_STORE=str(tmp_path / "store"),
               ADAPTER_SERVER_MAX_BATCH="2", ADAPTER_SERVER_ADMIN_TOKEN_FILE=str(token_file))
    healthcheck = exec_form(next(rest for instr, rest in dockerfile(DOCKERFILES[0]) if instr == "HEALTHCHECK"))
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([sys.executable, *healthcheck[1:]], env=env, capture_output=True).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        url = f"http://127.0.0.1:{port}/admin/adapters"
        assert httpx.get(url, headers={"Authorization": "Bearer file-token"}).status_code == 200
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert (tmp_path / "store").is_dir()      # ADAPTER_SERVER_STORE reached serve
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- Dockerfiles

def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        instr, _, rest = (buf + s).partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for instr, rest in dockerfile(path):
        if instr == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def exec_form(rest: str) -> list[str]:
    flags, _, array = rest.partition("CMD ") if rest.startswith("--") else ("", "", rest)
    return json.loads(array)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_non_root_and_exposes_the_served_port(path):
    instrs = dockerfile(path)
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = dockerfile_env(path)
    assert_real_settings(env, path.name)
    assert env["ADAPTER_SERVER_HOST"] == "0.0.0.0"
    assert [rest for instr, rest in instrs if instr == "EXPOSE"] == [env["ADAPTER_SERVER_PORT"]]
    volumes = [json.loads(rest) for instr, rest in instrs if instr == "VOLUME"]
    assert volumes == [[env["ADAPTER_SERVER_STORE"]]]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_is_the_copied_script(path):
    instrs = dockerfile(path)
    copies = [shlex.split(rest) for instr, rest in instrs if instr == "COPY"]
    script = [c[-1] for c in copies if c[-2] == "docker/entrypoint.sh"]
    assert [exec_form(rest) for instr, rest in instrs if instr == "ENTRYPOINT"] == [script]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_the_build_context_holds(path):
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for instr, rest in dockerfile(path):
        if instr == "COPY":
            sources = [s.rstrip("/") for s in shlex.split(rest)[:-1] if not s.startswith("--")]
            for s in sources:
                assert (ROOT / s).exists(), f"{path.name}: COPY {s} does not exist"
                assert s in allowed, f"{path.name}: COPY {s} is excluded by .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_the_torch_of_setup_sh(path):
    pinned = re.search(r"torch==[0-9.]+", (ROOT / "scripts" / "setup.sh").read_text()).group()
    runs = " ".join(rest for instr, rest in dockerfile(path) if instr == "RUN")
    assert re.findall(r"torch==[0-9.]+", runs) == [pinned]


def test_cpu_image_bakes_in_the_default_model_and_cuda_image_serves_on_gpu():
    cpu, cuda = (dockerfile_env(p) for p in DOCKERFILES)
    cpu_runs = [rest for instr, rest in dockerfile(DOCKERFILES[0]) if instr == "RUN"]
    assert cpu["ADAPTER_SERVER_MODEL"] == "default" and cpu["ADAPTER_SERVER_DEVICE"] == "cpu"
    assert any("download.pytorch.org/whl/cpu" in r for r in cpu_runs)
    assert "adapter-server fetch-default" in cpu_runs     # no download when a container starts
    assert (cuda["ADAPTER_SERVER_DEVICE"], cuda["ADAPTER_SERVER_DTYPE"]) == ("cuda", "bfloat16")
    assert dockerfile(DOCKERFILES[1])[0][1].startswith("nvidia/cuda:")


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self):
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("status", [200, 503])
def test_dockerfile_healthcheck_command_probes_health(path, status):
    """Runs the HEALTHCHECK's exact command against a local HTTP server."""
    rest = next(rest for instr, rest in dockerfile(path) if instr == "HEALTHCHECK")
    command = exec_form(rest)
    assert command[0] == "python"
    _Health.status, _Health.paths = status, []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "ADAPTER_SERVER_PORT": str(server.server_address[1])}
        r = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
    assert _Health.paths == ["/health"]
    assert (r.returncode == 0) == (status == 200)


# ---------------------------------------------------------------- compose, proxy, Prometheus, Grafana

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


COMPOSE = load_yaml(DOCKER / "compose.yaml")
REPLICAS = {name: s for name, s in COMPOSE["services"].items() if "build" in s}


def replica_port(service: dict) -> str:
    env = {**dockerfile_env(ROOT / service["build"]["context"].replace("..", ".") / service["build"]["dockerfile"]),
           **service["environment"]}
    return str(env["ADAPTER_SERVER_PORT"])


def test_compose_runs_two_replicas_of_an_image_built_here_on_one_store():
    assert len(REPLICAS) == 2
    stores = set()
    for name, service in REPLICAS.items():
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert_real_settings(service["environment"], f"compose service {name}")
        store_path = dict(dockerfile_env(DOCKER / ".." / service["build"]["dockerfile"]),
                          **service["environment"])["ADAPTER_SERVER_STORE"]
        volume, mount = service["volumes"][0].split(":")[:2]
        assert mount == store_path and volume in COMPOSE["volumes"]
        stores.add(volume)
        assert "${ADAPTER_SERVER_ADMIN_TOKEN:?" in service["environment"]["ADAPTER_SERVER_ADMIN_TOKEN"]
    assert len(stores) == 1


def test_compose_healthchecks_probe_the_served_port():
    for name, service in REPLICAS.items():
        test = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{replica_port(service)}/ready" in test, name
    proxy = COMPOSE["services"]["proxy"]
    assert set(proxy["depends_on"]) == set(REPLICAS)
    assert all(c["condition"] == "service_healthy" for c in proxy["depends_on"].values())


def test_compose_mounts_config_files_that_exist():
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"


def test_nginx_balances_over_every_replica_and_streams_unbuffered():
    conf = (DOCKER / "nginx.conf").read_text()
    assert conf.count("{") == conf.count("}")
    upstream = re.search(r"upstream adapter_server \{(.*?)\}", conf, re.S).group(1)
    servers = set(re.findall(r"server ([\w.-]+:\d+)", upstream))
    assert servers == {f"{name}:{replica_port(s)}" for name, s in REPLICAS.items()}
    assert "proxy_pass http://adapter_server;" in conf
    assert "proxy_buffering off;" in conf           # SSE token streams
    limit_mb = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))
    assert limit_mb >= serve_parser().parse_args(["serve"]).max_upload_mb
    listen = re.search(r"listen (\d+);", conf).group(1)
    assert COMPOSE["services"]["proxy"]["ports"] == [f"8080:{listen}"]


def test_prometheus_scrapes_every_replica_directly():
    prom = load_yaml(DOCKER / "prometheus.yml")
    (job,) = prom["scrape_configs"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:{replica_port(s)}" for name, s in REPLICAS.items()}
    assert job["metrics_path"] == "/metrics"


GRAFANA = DOCKER / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "adapter-server.json").read_text())


def test_grafana_provisioning_points_at_the_mounted_dashboard_and_prometheus():
    mounts = dict(v.split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"][0]
    assert datasource["url"] == f"http://prometheus:{COMPOSE['services']['prometheus']['ports'][0].split(':')[1]}"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "adapter-server.yaml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    uids = {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


@pytest.fixture(scope="module")
def exposed_metric_names(tiny_loaded, tmp_path_factory) -> set[str]:
    """Every sample name a real server's /metrics shows once each kind of series has data."""
    from http_harness import live_server
    from prometheus_client.parser import text_string_to_metric_families

    with live_server(tiny_loaded, tmp_path_factory.mktemp("store")) as server:
        server.upload("alpha", seed=1)
        for adapter in ("alpha", None):
            r = httpx.post(server.url + "/generate", timeout=30, json={
                "inputs": "Hello", "parameters": {"adapter_id": adapter, "max_new_tokens": 2}})
            assert r.status_code == 200, r.text
        text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_queries_only_metrics_the_server_exposes(exposed_metric_names):
    exposed = exposed_metric_names
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in DASHBOARD["templating"]["list"]]
    queried = {m for e in exprs for m in re.findall(r"\badapter_server_\w+", e)}
    assert queried - exposed == set()
    # What the issue asks the dashboard to show.
    for needed in ("adapter_server_requests_total", "adapter_server_time_to_first_token_seconds_bucket",
                   "adapter_server_generated_tokens_total", "adapter_server_queue_depth",
                   "adapter_server_running_requests", "adapter_server_kv_cache_usage_ratio"):
        assert needed in queried


def test_metrics_doc_lists_exactly_the_exposed_metrics(exposed_metric_names):
    doc = (ROOT / "docs" / "metrics.md").read_text()
    table_names = set(re.findall(r"^\| `(adapter_server_\w+)` \|", doc, re.M))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed_metric_names
                if not n.endswith("_created")}
    assert table_names == families


# ---------------------------------------------------------------- Kubernetes

K8S = DOCKER / "k8s"


def k8s_objects(kustomize_dir: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) → object for a kustomization's resources, with its patches merged in
    (strategic merge by name for the lists used here: containers, volumes, volumeMounts)."""
    kust = load_yaml(kustomize_dir / "kustomization.yaml")
    objects: dict[tuple[str, str], dict] = {}
    for resource in kust["resources"]:
        path = (kustomize_dir / resource).resolve()
        if path.is_dir():
            objects.update(k8s_objects(path))
        else:
            for doc in yaml.safe_load_all(path.read_text()):
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    for generator in kust.get("secretGenerator", []):   # keys only: the files are the user's
        keys = [f.split("=", 1)[0] for f in generator["files"]]
        objects[("Secret", generator["name"])] = {"kind": "Secret", "data": dict.fromkeys(keys)}
    for patch in kust.get("patches", []):
        for doc in yaml.safe_load_all((kustomize_dir / patch["path"]).read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key in objects, f"patch {patch['path']} targets missing {key}"
            merge(objects[key], doc)
    return objects


def merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list) and all("name" in v for v in value):
            by_name = {item["name"]: item for item in base[key]}
            for item in value:
                if item["name"] in by_name:
                    merge(by_name[item["name"]], item)
                else:
                    base[key].append(item)
        else:
            base[key] = value


@pytest.mark.parametrize("overlay", [K8S, K8S / "cuda"], ids=["cpu", "cuda"])
def test_k8s_deployment_is_consistent(overlay):
    objects = k8s_objects(overlay)
    deployment = objects[("Deployment", "adapter-server")]
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service = objects[("Service", "adapter-server")]
    assert service["spec"]["selector"].items() <= labels.items()

    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    config = objects[("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])]["data"]
    assert_real_settings(list(config) + [e["name"] for e in container["env"]], f"{overlay.name} manifests")
    assert ports["http"] == int(config["ADAPTER_SERVER_PORT"])

    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {k: p["path"] for k, p in probes.items()} == {
        "startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    assert all(p["port"] in ports for p in probes.values())

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    store = volumes[mounts[config["ADAPTER_SERVER_STORE"]]]
    pvc = objects[("PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]     # every replica writes to it
    token_file = next(e["value"] for e in container["env"] if e["name"] == "ADAPTER_SERVER_ADMIN_TOKEN_FILE")
    secret_volume = volumes[mounts[str(Path(token_file).parent)]]["secret"]
    secret = objects[("Secret", secret_volume["secretName"])]
    assert Path(token_file).name in secret["data"]
    if config["ADAPTER_SERVER_MODEL"] != "default":
        assert mounts[config["ADAPTER_SERVER_MODEL"]] in volumes
        model_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config["ADAPTER_SERVER_MODEL"])
        assert model_mount["readOnly"] is True


def test_k8s_cuda_overlay_asks_for_a_gpu_and_the_cuda_image():
    objects = k8s_objects(K8S / "cuda")
    (container,) = objects[("Deployment", "adapter-server")]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert objects[("ConfigMap", "adapter-server-config")]["data"]["ADAPTER_SERVER_DEVICE"] == "cuda"
    images = load_yaml(K8S / "cuda" / "kustomization.yaml")["images"]
    assert [i["newTag"] for i in images] == ["cuda"]


def test_k8s_admin_token_file_is_ignored_by_git():
    token_file = load_yaml(K8S / "kustomization.yaml")["secretGenerator"][0]["files"][0].split("=", 1)[1]
    r = subprocess.run(["git", "check-ignore", "-q", str(K8S / token_file)], cwd=ROOT)
    assert r.returncode == 0, f"docker/k8s/{token_file} would be committable"


# ---------------------------------------------------------------- docs/configuration.md

def test_configuration_reference_matches_the_parsers():
    import runpy

    reference = runpy.run_path(str(ROOT / "docs" / "cli_reference.py"))
    assert reference["documented"]() == reference["render"](), \
        "docs/configuration.md is stale: run `python docs/cli_reference.py --write`"


def test_every_environment_variable_the_code_reads_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    packages = ("model", "adapters", "server", "training", "scripts")
    sources = [p for d in packages for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh")]
    used = {m for p in [*sources, ENTRYPOINT, *DOCKERFILES]
            for m in re.findall(r"\bADAPTER_SERVER_[A-Z0-9_]*[A-Z0-9]\b", p.read_text())}
    assert used and not {v for v in used if f"`{v}`" not in doc}


# ---------------------------------------------------------------- docs/deployment.md examples

def doc_curl_commands(path: Path) -> list[str]:
    """Every `curl` command in the file's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            if command.startswith("curl "):
                commands.append(command)
    return commands


def test_deployment_doc_curl_examples_work_against_a_real_server(tiny_loaded, tmp_path):
    """The documented requests, verbatim except for host, port and token, in document order."""
    from http_harness import ADMIN_TOKEN, live_server

    from adapter_helpers import adapter_bytes, random_adapter

    (tmp_path / "my-adapter.safetensors").write_bytes(
        adapter_bytes(tiny_loaded.model, random_adapter(tiny_loaded.model, seed=3), tiny_loaded.fingerprint))
    commands = doc_curl_commands(ROOT / "docs" / "deployment.md")
    assert len(commands) >= 4
    with live_server(tiny_loaded, tmp_path / "store") as server:
        host = server.url.removeprefix("http://")
        for command in commands:
            command = re.sub(r"localhost:80[0-9]0", host, command).replace("change-me", ADMIN_TOKEN)
            checked = "curl --fail-with-body -sS " + command.removeprefix("curl ")   # non-2xx fails
            r = subprocess.run(["bash", "-c", checked],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "ADAPTER_SERVER_ADMIN_TOKEN": ADMIN_TOKEN})
            assert r.returncode == 0, f"{command}\n{r.stdout}\n{r.stderr}"
