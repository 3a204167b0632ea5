"""Tokenizers behind one interface: HF `tokenizers` (tokenizer.json, and the GGUF byte-level BPE
rebuilt as a `tokenizers` object) and sentencepiece (Meta tokenizer.model).

BOS is never added by the backends; `encode` adds it per the tokenizer's config (or the caller's
`add_bos`). Chat templates write their own BOS where the model wants one, so encode a rendered
chat with add_bos=False (`encode_chat` does).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from .chat_template import LLAMA2_CHAT_TEMPLATE, ChatTemplateError, render_chat
from .config import UnsupportedModelError
from .loaders import CheckpointError, read_json

# End-of-turn / end-of-text markers of common chat formats: generation stops on them whenever
# the vocabulary has them as special tokens, whatever the config calls EOS.
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                "</s>", "<end_of_turn>")


class Tokenizer(ABC):
    def __init__(self, *, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 special_ids: Iterable[int], chat_template: str | None,
                 special_tokens: dict[str, str], extra_stop_ids: Iterable[int] = ()):
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.special_ids = frozenset(special_ids)
        self.chat_template = chat_template
        self.special_tokens = special_tokens    # bos_token/eos_token/... strings, for templates
        markers = (self.token_to_id(t) for t in _END_MARKERS)
        self.stop_ids = frozenset({eos_id, *extra_stop_ids, *(i for i in markers if i in self.special_ids)}
                                  - {None})

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abstractmethod
    def id_to_token(self, token_id: int) -> str | None: ...

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt, **self.special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


# ---- HF tokenizers -------------------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the settings HF keeps in tokenizer_config.json."""

    def __init__(self, tok: tokenizers.Tokenizer, *, special_tokens: dict[str, str],
                 add_bos: bool | None = None, chat_template: str | None = None,
                 extra_stop_ids: Iterable[int] = ()):
        self._tok = tok
        bos = special_tokens.get("bos_token")
        eos = special_tokens.get("eos_token")
        bos_id = tok.token_to_id(bos) if bos else None
        if add_bos is None:   # no explicit setting: do what the tokenizer's post-processor does
            add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        specials = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
        super().__init__(bos_id=bos_id, eos_id=tok.token_to_id(eos) if eos else None, add_bos=add_bos,
                         special_ids=specials, chat_template=chat_template,
                         special_tokens=special_tokens, extra_stop_ids=extra_stop_ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def backend_json(self) -> str:
        """The `tokenizers` JSON (grammar engines rebuild the exact tokenizer from it)."""
        return self._tok.to_str()

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    @classmethod
    def from_dir(cls, path: Path) -> "HFTokenizer":
        try:
            tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:   # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{path / 'tokenizer.json'}: unreadable ({e})") from e
        config = _read_json(path / "tokenizer_config.json")
        special = {k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (s := _token_content(config.get(k)))}
        template = config.get("chat_template")
        if isinstance(template, list):   # named templates: [{"name", "template"}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        return cls(tok, special_tokens=special, add_bos=config.get("add_bos_token"),
                   chat_template=template, extra_stop_ids=extra)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "HFTokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' "
                                        "byte-level BPE); load the HF or Meta checkpoint instead")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]

        gguf_keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
        special = {name: tokens[i] for name, key in gguf_keys.items()
                   if (i := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None}
        extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(gguf_byte_bpe(meta), special_tokens=special,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), extra_stop_ids=extra)

    def save(self, out_dir: Path) -> None:
        """tokenizer.json + tokenizer_config.json, loadable by `from_dir` and by transformers."""
        self._tok.save(str(out_dir / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "add_bos_token": self.add_bos, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "chat_template": self.chat_template}
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (out_dir / "tokenizer_config.json").write_text(text)


def _gguf_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("default", "gpt-2"):
        return byte_level
    if name in ("smollm", "starcoder"):   # llama.cpp: every digit its own piece, then GPT-2 splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise UnsupportedModelError(f"GGUF pre-tokenizer {name!r} is not supported")


def gguf_byte_bpe(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """The GGUF 'gpt2' vocabulary (tokens, merges, token types) as a `tokenizers.Tokenizer`."""
    from gguf import TokenType  # noqa: PLC0415

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                          fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole in text, before pre-tokenization.
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_tokens([AddedToken(tokens[i], special=t == TokenType.CONTROL, normalized=False)
                    for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)])
    return tok


# ---- sentencepiece -------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """Meta's tokenizer.model. Control pieces written in text (<s>, </s>) become their ids, as in
    HF's LlamaTokenizer, so chat templates can write BOS/EOS."""

    def __init__(self, model_file: Path, *, add_bos: bool = True, chat_template: str | None = None):
        import sentencepiece  # noqa: PLC0415

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{model_file}: not a sentencepiece model ({e})") from e
        sp = self._sp
        n = sp.get_piece_size()
        controls = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) and sp.id_to_piece(i)}
        self._control_re = re.compile("|".join(map(re.escape, sorted(controls, key=len, reverse=True))))
        self._controls = controls
        bos, eos = sp.bos_id(), sp.eos_id()
        special = {k: sp.id_to_piece(i) for k, i in (("bos_token", bos), ("eos_token", eos),
                                                      ("unk_token", sp.unk_id())) if i >= 0}
        super().__init__(bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None,
                         add_bos=add_bos,
                         special_ids={*controls.values(), *([sp.unk_id()] if sp.unk_id() >= 0 else [])},
                         chat_template=chat_template, special_tokens=special)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def id_to_token(self, token_id: int) -> str | None:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def _encode(self, text: str) -> list[int]:
        if not self._controls:
            return self._sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._control_re.finditer(text):
            if m.start() > pos:
                ids += self._sp.encode(text[pos:m.start()])
            ids.append(self._controls[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._sp.encode(text[pos:])
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                parts.append(self._sp.decode(run))
                run = []
                if not skip_special:
                    parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)


# ---- loading -------------------------------------------------------------------------------------

def load_tokenizer(path: Path, gguf_metadata: dict[str, Any] | None = None) -> Tokenizer:
    """A checkpoint's tokenizer: from its GGUF metadata, else tokenizer.json or tokenizer.model in `path`."""
    if gguf_metadata is not None:
        return HFTokenizer.from_gguf(gguf_metadata)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(path)
    if (path / "tokenizer.model").is_file():
        config = _read_json(path / "tokenizer_config.json")
        return SentencePieceTokenizer(path / "tokenizer.model", add_bos=config.get("add_bos_token", True),
                                      chat_template=config.get("chat_template") or LLAMA2_CHAT_TEMPLATE)
    raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model")


def _read_json(path: Path) -> dict[str, Any]:
    """An optional settings file: {} when absent."""
    return read_json(path) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
