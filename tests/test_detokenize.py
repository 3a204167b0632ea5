"""Incremental detokenization (byte-level BPE and sentencepiece byte fallback) and stop strings."""

import random

import pytest
import sentencepiece
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.tokenizer import HFTokenizer, SentencePieceTokenizer
from server.detokenize import IncrementalDetokenizer, StopStringMatcher

CORPUS = ["The quick brown fox jumps over the lazy dog. héllo wörld, naïve café.",
          "日本語のテキスト 🙂🚀 ünïcödé and again the fox"] * 20
SAMPLE = "Hello fox! héllo 日本語 🙂🚀 naïve\n  café ünï 12345 中文 🦊 € 🙂"


def byte_bpe_tokenizer(vocab_size: int = 400) -> HFTokenizer:
    """A small trained byte-level BPE (like the default model's): many characters span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return HFTokenizer(tok, special_tokens={"eos_token": "<|im_end|>"})


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=340, byte_fallback=True,
        model_type="bpe", minloglevel=2)
    return SentencePieceTokenizer(d / "m.model")


def stream(tokenizer, prompt_ids, ids) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece"])
def test_stream_equals_full_decode_and_never_splits_a_character(kind, sp_tokenizer):
    tok = byte_bpe_tokenizer() if kind == "byte_bpe" else sp_tokenizer
    prompt = tok.encode("The fox says:", add_bos=False)
    ids = tok.encode(" " + SAMPLE, add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "sample must split characters over tokens"
    pieces = stream(tok, prompt, ids)
    assert all("\ufffd" not in p for p in pieces)
    # The stream continues the prompt text exactly (sentencepiece keeps the leading space).
    assert tok.decode(prompt + ids) == tok.decode(prompt) + "".join(pieces)
    if kind == "byte_bpe":     # (sentencepiece normalizes whitespace)
        assert "".join(pieces) == " " + SAMPLE


def test_special_tokens_are_skipped_and_invalid_bytes_surface_only_at_the_end():
    tok = byte_bpe_tokenizer()
    eos = tok.eos_id
    ids = tok.encode("fox 🙂", add_bos=False)
    pieces = stream(tok, [], ids + [eos])
    assert "".join(pieces) == "fox 🙂"
    # A character cut short at the end of generation is flushed (as U+FFFD), not lost.
    partial = tok.encode("🙂", add_bos=False)
    assert len(partial) > 1
    pieces = stream(tok, [], partial[:-1])
    assert pieces[:-1] == [""] * (len(partial) - 1) and pieces[-1].endswith("\ufffd")


def push_all(matcher, parts):
    out = []
    for p in parts:
        emit, matched = matcher.push(p)
        out.append(emit)
        if matched:
            return out, matched
    out.append(matcher.flush())
    return out, None


def test_stop_string_split_over_pieces_is_never_shown():
    m = StopStringMatcher(["###", "END"])
    out, matched = push_all(m, ["Hello #", "#", " no", " E", "N", "D tail"])
    # "# " broke the first candidate; "END" matched across three pieces.
    assert matched == "END"
    assert "".join(out) == "Hello ## no "
    assert out == ["Hello ", "", "## no", " ", "", ""]


def test_earliest_stop_wins_and_text_without_stops_passes_through():
    out, matched = push_all(StopStringMatcher(["lazy", "fox"]), ["the fox and the lazy dog"])
    assert matched == "fox" and out == ["the "]
    out, matched = push_all(StopStringMatcher([]), ["a", "b"])
    assert matched is None and out == ["a", "b", ""]
    out, matched = push_all(StopStringMatcher(["xyz"]), ["abx", "y"])
    assert matched is None and "".join(out) == "abxy" and out[-1] == "xy"


def test_stop_matcher_random_pieces_against_reference():
    rng = random.Random(0)
    stops = ["ab", "bca", "cc"]
    for _ in range(300):
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(3, len(text) + 1)))
        parts = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        out, matched = push_all(StopStringMatcher(stops), parts)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            idx, s = min(hits)
            assert matched == s and "".join(out) == text[:idx]
        else:
            assert matched is None and "".join(out) == text
        # Only a possible start of a stop string is ever held back.
        m, shown, seen = StopStringMatcher(stops), "", ""
        for part in parts:
            emit, matched = m.push(part)
            if matched:
                break
            shown, seen = shown + emit, seen + part
            assert shown + m.buffer == seen
            assert m.buffer == "" or any(s.startswith(m.buffer) and s != m.buffer for s in stops)
