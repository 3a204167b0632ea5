"""Shared fixtures.

* `tiny_config(**overrides)` — a small LLaMA `ModelConfig` (4 layers, dim 64, GQA 4/2 heads);
  a plain function, also exposed as the fixture `tiny_config_factory`.
* `make_tiny_model(seed=0, **config_overrides)` — fixture returning a factory of random, frozen,
  eval-mode `Transformer`s (norm weights randomised too, so a swapped norm cannot hide).
* `tiny_model_dir` (session) — an HF-format directory holding a random tiny LLaMA and a small
  byte-level BPE tokenizer with ChatML special tokens and template: `load_model(tiny_model_dir)`
  gives a full `LoadedModel` in well under a second.
* `tiny_loaded` (session) — `load_model(tiny_model_dir, weights="fp32")`, packed for inference.
  Treat it as read-only. `fresh_tiny_loaded` — a dense load of its own (training).
* `default_model` (session) — `load_model("default")` (SmolLM2-135M-Instruct, fetched and
  converted on first use). Tests using it should be few and marked `@pytest.mark.slow`.
* `greedy` — `greedy(model, prompt_ids, max_new_tokens, adapters=None, stop_ids=())` →
  (token ids, their log-probs): the plainest prefill + one-token-per-step decode with a paged KV cache,
  a reference for comparing against transformers/PEFT and for the engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.kv_cache import PagedKVCache
from model.llama import Transformer

_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.",
    "Hello, world! How are you today?", "Below is an instruction that describes a task.",
]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=160,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256)
    return ModelConfig(**{**base, **overrides})


def random_tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.requires_grad_(False).eval()


def greedy_generate(model, prompt_ids, max_new_tokens, adapters=None, stop_ids=()):
    n_blocks = -(-(len(prompt_ids) + max_new_tokens) // 16)
    cache = PagedKVCache.for_model(model, n_blocks, 16)
    table = torch.arange(n_blocks)[None]
    tokens = torch.tensor([prompt_ids])
    positions = torch.arange(len(prompt_ids))[None]
    out, logprobs = [], []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            last = torch.tensor([tokens.shape[1] - 1])
            lp = model(tokens, positions, cache, table, adapters, logits_index=last)[0].log_softmax(-1)
            token = int(lp.argmax())
            out.append(token)
            logprobs.append(float(lp[token]))
            if token in stop_ids:
                break
            tokens, positions = torch.tensor([[token]]), positions[:, -1:] + 1
    return out, logprobs


@pytest.fixture
def greedy():
    return greedy_generate


@pytest.fixture
def tiny_config_factory():
    return tiny_config


@pytest.fixture
def make_tiny_model():
    return random_tiny_model


def _tiny_tokenizer(vocab_size: int):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from model.tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return HFTokenizer(tok, special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
                       add_bos=False, chat_template=_CHATML)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from model.loaders import hf

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer(300)
    model = random_tiny_model(vocab_size=tokenizer.vocab_size)
    hf.write_checkpoint(out, model.config, model.state_dict(), tokenizer.bos_id, tokenizer.eos_id)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """Shared by the serving tests: loaded for inference (fp32 weights, packed at load)."""
    from model.loading import load_model

    return load_model(tiny_model_dir, weights="fp32")


@pytest.fixture
def fresh_tiny_loaded(tiny_model_dir):
    """A load of its own with dense weights (no weight mode): for training and dense-weight checks."""
    from model.loading import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def default_model():
    from model.loading import load_model

    return load_model("default")
