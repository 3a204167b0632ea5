"""Tokenizers agree with transformers' for the same files; chat templates render like HF's."""

from __future__ import annotations

import io

import pytest

from model.chat_template import ChatTemplateError, render_chat
from model.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

SAMPLES = [
    "Hello world", "  leading spaces and   runs\t\ttabs\n\n\nnewlines  ",
    "123 4567 89012 3.14159 -42 1e10",
    "naïve café 日本語のテキスト Ελληνικά русский", "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "def f(x):\n    return x**2  # square\n", "don't won't it's I'm", '$$ \\frac{a}{b} $$ {"k": [1,2]}',
    "   ", "", "tab\tsep\u00a0nbsp\u200bzwsp", "\r\nwindows\r\n",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def sp_model_dir(tmp_path_factory):
    """A tiny Llama-style sentencepiece model (BPE, byte fallback, split digits) in a Meta-like dir."""
    spm = pytest.importorskip("sentencepiece")
    corpus = 20 * ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
                   "def add(a, b):\n    return a + b", "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024",
                   "naïve café résumé", "Hello, world! How are you?", "日本語 テキスト",
                   "Ελληνικά русский язык"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


def test_sentencepiece_matches_transformers(sp_model_dir):
    ours = SentencePieceTokenizer(sp_model_dir / "tokenizer.model")
    ref = transformers.LlamaTokenizer(str(sp_model_dir / "tokenizer.model"), legacy=True)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (ref.bos_token_id, ref.eos_token_id, True)
    for text in SAMPLES + ["<s>[INST] hi [/INST] yo </s>"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        if not text[:1].isspace():   # HF's legacy decode drops a leading space; sentencepiece keeps it
            assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.encode(text, add_bos=False) == ids[1:]
    for text in SAMPLES:   # sentencepiece (identity normalisation, byte fallback) round-trips exactly
        assert ours.decode(ours.encode(text)) == text
    assert ours.is_special(ours.bos_id) and not ours.is_special(ours.encode("a", add_bos=False)[0])
    assert ours.eos_id in ours.stop_ids
    assert ours.decode([ours.bos_id, *ours.encode("hi", add_bos=False)], skip_special=False) == "<s>hi"


def test_meta_checkpoint_gets_llama2_chat_template(sp_model_dir):
    tok = load_tokenizer(sp_model_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    text = tok.apply_chat_template(CHAT)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
                    "<s>[INST] Capital of France? [/INST]")
    ids = tok.encode_chat(CHAT)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1
    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_hf_dir_tokenizer_matches_transformers(tiny_model_dir):
    ours = HFTokenizer.from_dir(tiny_model_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False,
                                                                     add_generation_prompt=True)
    assert ours.encode_chat(CHAT) == ref.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ours.stop_ids == {ours.eos_id, ours.token_to_id("<|endoftext|>")}
    assert ours.is_special(ours.bos_id) and ours.add_bos is False


def test_add_bos_follows_the_post_processor_without_explicit_setting(tiny_model_dir, tmp_path):
    import json
    import shutil

    import tokenizers

    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos = "<|im_start|>"
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|im_end|>"}))
    ours = HFTokenizer.from_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.add_bos and ours.encode("hi") == ref.encode("hi")
    assert ours.encode("hi", add_bos=False) == ref.encode("hi", add_special_tokens=False)


def test_template_sandbox_and_errors():
    with pytest.raises(ChatTemplateError, match="custom failure"):
        render_chat("{{ raise_exception('custom failure') }}", [])
    with pytest.raises(ChatTemplateError, match="messages must be"):
        render_chat("{{ messages }}", [{"role": "user"}])
    with pytest.raises(ChatTemplateError):   # the sandbox refuses attribute tricks
        render_chat("{{ ''.__class__.__mro__ }}", [])
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "u", "content": "é"}]) == \
        '{"role": "u", "content": "é"}'


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers_gguf(default_model):
    """Our GGUF byte-BPE (as converted into the default model's tokenizer.json) against
    transformers' own GGUF tokenizer, an independent reading of the same file."""
    from model.default_model import GGUF_NAME

    ours_dir = default_model.tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(default_model.path, gguf_file=GGUF_NAME)
    for text in SAMPLES + ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b <repo_name>", " 1 22 333"]:
        ids = ref.encode(text)
        assert ours_dir.encode(text) == ids, text
        assert ours_dir.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (ours_dir.bos_id, ours_dir.eos_id, ours_dir.add_bos) == (1, 2, False)
    assert ours_dir.token_to_id("<|im_end|>") in ours_dir.stop_ids
    ref_dir = transformers.AutoTokenizer.from_pretrained(default_model.path)
    assert ours_dir.apply_chat_template(CHAT[1:2]) == ref_dir.apply_chat_template(
        CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert ours_dir.apply_chat_template(CHAT[1:2]).startswith("<|im_start|>system\n")
