"""docker/: the entrypoint run for real (outside Docker), and the images, compose file, proxy,
Prometheus, Grafana and Kubernetes files checked against the real serve options, ports,
probes and metric names, since no Docker engine or cluster runs them here."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

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
