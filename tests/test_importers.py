"""Importers: PEFT (incl. multi-adapter folders) and official LLaMA-Adapter v1; PEFT export; CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from adapter_helpers import random_adapter
from adapters.format import load_adapter, metadata_for
from adapters.importers import (AdapterImportError, adapter_file_bytes, export_peft, import_llama_adapter,
                                import_peft)
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from model.adapter import AdapterBatch, AdapterWeights
from model.fingerprint import base_fingerprint
from model.hf_names import ours_to_hf
from model.loaders import build_model, read_checkpoint
from server.cli import main as cli_main

TOKENS = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def _hf_copy(model):
    """transformers LlamaForCausalLM with our model's weights (HF layout: no permutation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_hf_config(), attn_implementation="eager"))
    hf.load_state_dict({ours_to_hf(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf.eval()


def _store_and_run(tmp_path, model, imported, tokens=TOKENS):
    """import → store → registry lease → our forward with the adapter."""
    reg = AdapterRegistry(AdapterStore(tmp_path / "store"), model, base_fingerprint(model))
    meta = metadata_for(imported.weights, model, imported.source, imported.extra, reg.fingerprint)
    info = reg.upload(imported.label, adapter_file_bytes(imported.weights, meta), source=imported.source)
    with reg.acquire(info.ref) as lease, torch.no_grad():
        batch = AdapterBatch.build([lease.kv] * tokens.shape[0], model.config.n_layers)
        return model(tokens, adapters=batch), reg


@pytest.fixture
def peft_setup(tmp_path, make_tiny_model):
    """A PEFT folder with two adaption-prompt adapters ("default" K=3 L=2, "other" K=5 L=3)."""
    from peft import AdaptionPromptConfig, get_peft_model

    model = make_tiny_model()
    peft_model = get_peft_model(_hf_copy(model), AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    peft_model.add_adapter("other", AdaptionPromptConfig(adapter_len=5, adapter_layers=3,
                                                         task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    logits = {}
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if pname.endswith("adaption_prompt"):
                    p.copy_(torch.randn_like(p))
                elif pname.endswith("adaption_gate"):
                    p.uniform_(0.3, 1.0)
            logits[name] = peft_model(TOKENS).logits
    folder = tmp_path / "peft"
    peft_model.save_pretrained(folder)
    return model, folder, logits


def test_peft_round_trip_matches_peft_logits(tmp_path, peft_setup):
    model, folder, peft_logits = peft_setup
    imported = import_peft(folder, model.config)
    assert [a.label for a in imported] == ["default", "other"]
    for a in imported:
        ours, reg = _store_and_run(tmp_path / a.label, model, a)
        torch.testing.assert_close(ours, peft_logits[a.label], atol=1e-4, rtol=0)
    base = model(TOKENS)
    assert (peft_logits["default"] - base).abs().max() > 1e-2    # the adapter really changes things
    d, o = imported[0].weights, imported[1].weights
    assert (d.layers, d.adapter_len, o.layers, o.adapter_len) == ([2, 3], 3, [1, 2, 3], 5)
    assert imported[0].extra["peft_adapter"] == "default"


def test_peft_single_adapter_selection_and_mixed_batch(tmp_path, peft_setup):
    model, folder, peft_logits = peft_setup
    (other,) = import_peft(folder, model.config, only="other")
    (default,) = import_peft(folder, model.config, only="default")
    with pytest.raises(AdapterImportError, match="no PEFT adapter 'nope'"):
        import_peft(folder, model.config, only="nope")
    # Two adapters of different K and the base model in one batch: each row as if alone.
    reg = AdapterRegistry(AdapterStore(tmp_path / "s"), model, base_fingerprint(model))
    kvs = []
    for a in (default, other):
        meta = metadata_for(a.weights, model, a.source, a.extra, reg.fingerprint)
        kvs.append(reg.acquire(reg.upload(a.label, adapter_file_bytes(a.weights, meta)).ref).kv)
    tokens = TOKENS[:1].expand(3, -1)
    with torch.no_grad():
        out = model(tokens, adapters=AdapterBatch.build([kvs[0], kvs[1], None], model.config.n_layers))
    torch.testing.assert_close(out[0], peft_logits["default"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], peft_logits["other"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2], model(TOKENS[:1])[0], atol=1e-5, rtol=0)


def test_export_to_peft_round_trips(tmp_path, peft_setup):
    from peft import PeftModel

    model, folder, peft_logits = peft_setup
    (a,) = import_peft(folder, model.config, only="default")
    meta = metadata_for(a.weights, model, a.source, a.extra)
    out = export_peft(a.weights, meta, tmp_path / "exported")
    reloaded = PeftModel.from_pretrained(_hf_copy(model), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, peft_logits["default"], atol=1e-5, rtol=0)
    (again,) = import_peft(out, model.config)
    assert torch.equal(again.weights.prompts, a.weights.prompts)
    assert torch.equal(again.weights.gates, a.weights.gates)
    with pytest.raises(AdapterImportError, match="already holds"):
        export_peft(a.weights, meta, out)


def test_export_refuses_what_peft_cannot_express(tmp_path, make_tiny_model):
    model = make_tiny_model()
    per_head = random_adapter(model, per_head=True)
    with pytest.raises(AdapterImportError, match="per-head gates"):
        export_peft(per_head, metadata_for(per_head, model, "trained"), tmp_path / "a")
    uniform = AdapterWeights(per_head.layers, per_head.prompts, torch.full((2, 4), 0.5))
    export_peft(uniform, metadata_for(uniform, model, "trained"), tmp_path / "b")   # equal heads: fine
    gappy = random_adapter(model, layers=[1, 3])
    with pytest.raises(AdapterImportError, match="top layers"):
        export_peft(gappy, metadata_for(gappy, model, "trained"), tmp_path / "c")


def test_peft_refusals(tmp_path, peft_setup, make_tiny_model):
    model, folder, _ = peft_setup
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterImportError, match=r"weights_only=True\), which never runs its code"):
        import_peft(pickled, model.config)
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterImportError, match="'IA3' is not supported"):
        import_peft(ia3, model.config)
    with pytest.raises(AdapterImportError, match="no adapter_config.json"):
        import_peft(_empty_dir(tmp_path), model.config)
    deeper = make_tiny_model(n_layers=6)
    with pytest.raises(AdapterImportError, match="not the top 2 of this 6-layer model"):
        import_peft(folder, deeper.config, only="default")


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


# ---- official LLaMA-Adapter v1 ---------------------------------------------------------------
def _official_reference(state, cfg, tokens, adapter, adapter_len, raw_gate=False):
    """Forward pass written the way the official v1 code does it (Meta layout, complex RoPE)."""
    n_layers, dim, h = cfg.n_layers, cfg.dim, cfg.n_heads
    hd = dim // h
    b, t = tokens.shape
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs_cis = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    n_adapted = adapter["adapter_query.weight"].shape[0] // adapter_len
    prompts = adapter["adapter_query.weight"].reshape(n_adapted, adapter_len, dim)
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = state["tok_embeddings.weight"][tokens]
    for i in range(n_layers):
        p = f"layers.{i}."
        xn = rms(x, state[p + "attention_norm.weight"])
        q, k, v = (xn @ state[p + f"attention.{w}.weight"].T for w in ("wq", "wk", "wv"))
        q, k = rope(q.view(b, t, h, hd)), rope(k.view(b, t, h, hd))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, h, hd).transpose(1, 2)
        out = F.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, dim=-1) @ v
        j = i - (n_layers - n_adapted)
        if j >= 0:
            ak = (prompts[j] @ state[p + "attention.wk.weight"].T).view(1, adapter_len, h, hd).transpose(1, 2)
            av = (prompts[j] @ state[p + "attention.wv.weight"].T).view(1, adapter_len, h, hd).transpose(1, 2)
            gate = adapter[p + "attention.gate"]
            scores = F.softmax(q @ ak.transpose(2, 3) / math.sqrt(hd), dim=-1)
            out = out + (gate if raw_gate else gate.tanh()) * scores @ av
        x = x + out.transpose(1, 2).reshape(b, t, dim) @ state[p + "attention.wo.weight"].T
        xn = rms(x, state[p + "ffn_norm.weight"])
        ff = F.silu(xn @ state[p + "feed_forward.w1.weight"].T) * (xn @ state[p + "feed_forward.w3.weight"].T)
        x = x + ff @ state[p + "feed_forward.w2.weight"].T
    return rms(x, state["norm.weight"]) @ state["output.weight"].T


@pytest.fixture
def official_setup(tmp_path, make_tiny_model):
    """A tiny Meta-format model (v1 LLaMA: no GQA) and an official-format adapter .pth."""
    donor = make_tiny_model(n_layers=5, n_kv_heads=4, seed=3)
    cfg = donor.config
    state = {k: v.clone() for k, v in donor.state_dict().items()}   # read as Meta layout
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps(cfg.to_meta_params()))
    torch.save(state, meta_dir / "consolidated.00.pth")
    model = build_model(read_checkpoint(meta_dir))
    k_len, n_adapted = 4, 3
    g = torch.Generator().manual_seed(7)
    adapter = {"adapter_query.weight": torch.randn(n_adapted * k_len, cfg.dim, generator=g)}
    for i in range(cfg.n_layers):       # gates exist for every layer; the lower ones are unused
        adapter[f"layers.{i}.attention.gate"] = torch.randn(1, cfg.n_heads, 1, 1, generator=g)
    pth = tmp_path / "llama_adapter_len4_layer3_release.pth"
    torch.save(adapter, pth)
    return model, state, adapter, pth, k_len


@pytest.mark.parametrize("raw_gate", [False, True])
def test_official_import_matches_the_official_forward(tmp_path, official_setup, raw_gate):
    model, state, adapter, pth, k_len = official_setup
    imported = import_llama_adapter(pth, model.config, adapter_len=k_len, raw_gate=raw_gate)
    w = imported.weights
    assert w.layers == [2, 3, 4] and w.gate_kind == "per_head" and w.adapter_len == k_len
    gate = adapter["layers.4.attention.gate"].reshape(-1)
    torch.testing.assert_close(w.gates[2], gate if raw_gate else gate.tanh())
    assert imported.extra["gate_activation"] == ("raw" if raw_gate else "tanh")
    ours, _ = _store_and_run(tmp_path, model, imported)
    with torch.no_grad():
        ref = _official_reference(state, model.config, TOKENS, adapter, k_len, raw_gate)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_official_import_refusals(tmp_path, official_setup):
    model, _, adapter, pth, _ = official_setup
    with pytest.raises(AdapterImportError, match="not a multiple of --adapter-len 5"):
        import_llama_adapter(pth, model.config, adapter_len=5)
    with pytest.raises(AdapterImportError, match="3 adapted layers.*has 5|12 adapted layers"):
        import_llama_adapter(pth, model.config, adapter_len=1)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({**adapter, "args": argparse.Namespace(lr=1.0)}, unsafe)
    with pytest.raises(AdapterImportError, match="weights_only=True"):
        import_llama_adapter(unsafe, model.config, adapter_len=4)
    v2 = tmp_path / "v2.pth"
    torch.save({**adapter, "visual_proj.weight": torch.zeros(2, 2)}, v2)
    with pytest.raises(AdapterImportError, match="unexpected key 'visual_proj.weight'"):
        import_llama_adapter(v2, model.config, adapter_len=4)
    scalar = tmp_path / "first_commit.pth"
    torch.save({"adapter_query.weight": adapter["adapter_query.weight"],
                **{f"layers.{i}.attention.gate": torch.zeros(1) for i in range(5)}}, scalar)
    assert import_llama_adapter(scalar, model.config, adapter_len=4).weights.gate_kind == "scalar"


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_import_list_show_export_delete(tmp_path, tiny_loaded, capsys):
    model = tiny_loaded.model
    w = random_adapter(model)
    src = export_peft(w, metadata_for(w, model, "trained"), tmp_path / "src")
    store = str(tmp_path / "store")
    model_dir = str(tiny_loaded.path)

    def run(*argv):
        code = cli_main(list(argv))
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = run("adapters", "import", str(src), "--format", "peft", "--name", "mine",
                    "--store", store, "--model", model_dir)
    assert code == 0 and "as mine@1" in out
    code, out = run("adapters", "list", "--store", store)
    assert code == 0 and "mine" in out and "2-3" in out
    code, out = run("adapters", "show", "mine@1", "--store", store)
    shown = json.loads(out)
    assert shown["source"] == "imported:peft" and shown["base_fingerprint"] == tiny_loaded.fingerprint
    stored, _ = load_adapter(AdapterStore(store).path(AdapterStore(store).resolve("mine@1")))
    assert torch.equal(stored.prompts, w.prompts) and torch.equal(stored.gates, w.gates)
    code, out = run("adapters", "export", "mine", "--format", "peft", "--out", str(tmp_path / "exp"),
                    "--store", store)
    assert code == 0
    (back,) = import_peft(tmp_path / "exp", model.config)
    assert torch.equal(back.weights.prompts, w.prompts)
    code, out = run("adapters", "import", str(src), "--format", "peft", "--out", str(tmp_path / "a.st"),
                    "--model", model_dir)
    assert code == 0 and torch.equal(load_adapter(tmp_path / "a.st")[0].prompts, w.prompts)
    code, out = run("adapters", "delete", "mine@1", "--store", store)
    assert code == 0 and "deleted mine@1" in out
    code, out = run("adapters", "show", "mine", "--store", store)
    assert code == 2 and "not found" in out
    code, out = run("adapters", "import", str(src), "--format", "peft", "--name", "../x",
                    "--store", store, "--model", model_dir)
    assert code == 2 and "invalid adapter name" in out


def test_cli_imports_and_exports_lora_and_prefix_tuning(tmp_path, tiny_loaded, capsys):
    from adapter_helpers import random_lora, random_prefix

    model = tiny_loaded.model
    store, model_dir = str(tmp_path / "store"), str(tiny_loaded.path)
    lora, prefix = random_lora(model, 4, ("q", "down"), layers=[1, 2]), random_prefix(model, 3)
    for name, w in (("lo", lora), ("pre", prefix)):
        src = export_peft(w, metadata_for(w, model, "trained"), tmp_path / f"src-{name}")
        assert cli_main(["adapters", "import", str(src), "--format", "peft", "--name", name, "--store", store,
                         "--model", model_dir]) == 0
    out = capsys.readouterr().out
    assert "as lo@1 (lora" in out and "r=4 on q,down" in out and "as pre@1 (prefix-tuning" in out and "P=3" in out
    assert cli_main(["adapters", "list", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "lora" in listing and "prefix-tuning" in listing
    assert cli_main(["adapters", "show", "lo@1", "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["lora_targets"] == ["q", "down"]
    for name, w in (("lo", lora), ("pre", prefix)):
        assert cli_main(["adapters", "export", name, "--format", "peft", "--out", str(tmp_path / f"exp-{name}"),
                         "--store", store]) == 0
        (back,) = import_peft(tmp_path / f"exp-{name}", model.config)
        assert type(back.weights) is type(w) and back.weights.param_count() == w.param_count()
    (back,) = import_peft(tmp_path / "exp-lo", model.config)
    assert back.weights.layers == [1, 2] and all(torch.equal(back.weights.b[t], lora.b[t]) for t in ("q", "down"))
