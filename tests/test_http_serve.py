"""`adapter-server serve` as a real process: configured by ADAPTER_SERVER_* variables (a flag wins
over its variable), logs what it loaded, serves, and shuts down gracefully on SIGTERM, letting a
stream in flight finish. Plus one end-to-end check on the embedded default model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from http_harness import live_server
from server.cli import build_parser
from server.serve import env_name

REPO = Path(__file__).resolve().parents[1]


def test_every_option_has_an_env_var_and_flags_win(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    flags = set(re.findall(r"(--[a-z][a-z-]+)", help_text)) - {"--help"}
    assert len(flags) >= 15
    for flag in flags:
        assert env_name(flag) in help_text, flag
    monkeypatch.setenv("ADAPTER_SERVER_MAX_BATCH", "3")
    monkeypatch.setenv("ADAPTER_SERVER_DEVICE", "cpu")
    monkeypatch.setenv("ADAPTER_SERVER_COMPILE", "false")
    args = build_parser().parse_args(["serve", "--port", "9"])
    assert (args.max_batch, args.device, args.compile, args.port) == (3, "cpu", False, 9)
    assert build_parser().parse_args(["serve", "--max-batch", "5"]).max_batch == 5
    monkeypatch.setenv("ADAPTER_SERVER_MAX_BATCH", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
    assert "ADAPTER_SERVER_MAX_BATCH" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_env_config_and_graceful_shutdown(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "ADAPTER_SERVER_MODEL": str(tiny_model_dir), "ADAPTER_SERVER_STORE": str(tmp_path / "store"),
           "ADAPTER_SERVER_PORT": str(port), "ADAPTER_SERVER_DEVICE": "cpu", "ADAPTER_SERVER_MAX_BATCH": "2",
           "ADAPTER_SERVER_MAX_SEQ_LEN": "32", "ADAPTER_SERVER_ADMIN_TOKEN": "s3cret",
           "ADAPTER_SERVER_MODEL_ID": "tiny"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--max-seq-len", "200"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)

        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny"]
        # --max-seq-len 200 on the command line won over ADAPTER_SERVER_MAX_SEQ_LEN=32
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 150, "ignore_eos_token": True}}
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/generate_stream", json=body) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data:"))
            events = [json.loads(next(lines)[5:])]
            proc.send_signal(signal.SIGTERM)     # the stream in flight is allowed to finish (drain)
            events += [json.loads(line[5:]) for line in lines]
        assert len(events) == 150 and events[-1]["details"]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text()
    for expected in ("loaded tiny-llama", "adapter store", "admin API on", f"listening on http://127.0.0.1:{port}",
                     "inference is open", "stopped"):
        assert expected in log_text, log_text
    assert "s3cret" not in log_text and "Traceback" not in log_text


@pytest.mark.slow
def test_default_model_end_to_end(default_model, tmp_path):
    """SmolLM2-135M-Instruct through the whole stack: chat template, streaming, an uploaded adapter."""
    with live_server(default_model, tmp_path / "store", max_batch=2, max_seq_len=512) as s:
        s.upload("fresh", seed=0)
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        kw = dict(messages=messages, max_tokens=16, temperature=0, logprobs=True)
        base = client.chat.completions.create(model=default_model.name, **kw).choices[0]
        assert "Paris" in base.message.content
        adapted = client.chat.completions.create(model="fresh", **kw).choices[0]
        assert adapted.logprobs.content[0].logprob != pytest.approx(base.logprobs.content[0].logprob)
        streamed = "".join(c.choices[0].delta.content or ""
                           for c in client.chat.completions.create(model="fresh", **kw, stream=True) if c.choices)
        assert streamed == adapted.message.content
