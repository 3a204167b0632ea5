"""Instruction data → token ids with response-only labels, and the deterministic batch plan.

Two input shapes, one file each, JSON array or JSON Lines:
  Alpaca  {"instruction", "input" (optional), "output"} rendered with the Stanford Alpaca template
  chat    {"messages": [{"role", "content"}, ...]} rendered with the base model's chat template,
          loss on the assistant turns only.
Image instructions (image adapters) add {"image": path} to an Alpaca record, the path relative to
the data file; every record of such a file has one. The text is encoded exactly as without it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100  # label value excluded from the loss (F.cross_entropy's ignore_index)

# Stanford Alpaca's template, verbatim; the prompt ends right after "### Response:".
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")


class DataError(ValueError):
    """The training data is unusable; the message names the file, record and problem."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]      # same length; IGNORE over the prompt (and the chat scaffolding)
    image: Path | None = None   # image instructions: the image file

    @property
    def n_targets(self) -> int:
        """Positions that count in the loss; position 0 is never one (nothing predicts it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON array of objects, or one JSON object per line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"training data not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON line ({e})") from None
    if not records:
        raise DataError(f"{path}: no training records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is not a JSON object")
    return records


def encode_record(rec: dict[str, Any], tokenizer, where: str) -> Example:
    if "messages" in rec:
        return encode_chat(rec["messages"], tokenizer, where)
    missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
    if missing or not isinstance(rec.get("input", ""), str):
        raise DataError(f"{where}: expected Alpaca fields instruction/input/output (strings) or "
                        f"'messages'; got keys {sorted(rec)}")
    return encode_alpaca(rec["instruction"], rec.get("input", ""), rec["output"], tokenizer)


def encode_alpaca(instruction: str, input: str, output: str, tokenizer) -> Example:
    """BOS (if the tokenizer uses one) + prompt, then output + EOS; only the latter is learned.

    Prompt and output are tokenized separately so the prompt ids are exactly what a client
    sending the same prompt text to the server gets.
    """
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token; Alpaca training needs one to end outputs")
    prompt = tokenizer.encode(alpaca_prompt(instruction, input))
    target = tokenizer.encode(output, add_bos=False) + [tokenizer.eos_id]
    return Example(prompt + target, [IGNORE] * len(prompt) + target)


def encode_chat(messages: Any, tokenizer, where: str) -> Example:
    """Render with the model's chat template; learn each assistant turn (content + end-of-turn).

    Turn i's target is the text that rendering messages[:i+1] adds to rendering messages[:i]
    with the generation prompt, i.e. exactly what the model must produce when served.
    """
    if (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already tokenized
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        context = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (context.startswith(done) and full.startswith(context)):
            raise DataError(f"{where}: the chat template does not render turns as a growing prefix; "
                            "cannot tell the assistant text apart")
        # Chat templates write their own BOS where the model wants one (as the server encodes them).
        prompt_part = tokenizer.encode(context[len(done):], add_bos=False)
        target_part = tokenizer.encode(full[len(context):], add_bos=False)
        ids += prompt_part + target_part
        labels += [IGNORE] * len(prompt_part) + target_part
        done = full
    return Example(ids, labels)


def image_path(rec: dict[str, Any], base: Path, where: str) -> Path:
    if "messages" in rec or not isinstance(rec["image"], str) or not rec["image"]:
        raise DataError(f"{where}: 'image' must be a file path (string) in an Alpaca record")
    image = base / rec["image"]
    if not image.is_file():
        raise DataError(f"{where}: image {image} not found")
    return image


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    sha256: str
    n_truncated: int
    n_dropped: int     # prompt alone filled max_len: nothing left to learn

    @property
    def has_images(self) -> bool:
        return self.train[0].image is not None


def load_dataset(path: str | Path, tokenizer, max_len: int, eval_fraction: float,
                 eval_max_examples: int, seed: int) -> Dataset:
    records = read_records(path)
    examples, n_trunc, n_drop = [], 0, 0
    with_images = sum("image" in rec for rec in records)
    if 0 < with_images < len(records):
        raise DataError(f"{path}: {with_images} of {len(records)} records have an 'image'; an image-instruction "
                        "file needs one in every record")
    for i, rec in enumerate(records):
        ex = encode_record(rec, tokenizer, f"{path}: record {i}")
        if with_images:
            ex.image = image_path(rec, Path(path).parent, f"{path}: record {i}")
        if len(ex.input_ids) > max_len:
            n_trunc += 1
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.image)
        if ex.n_targets == 0:
            n_drop += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: every example's prompt fills max_len={max_len}; nothing to learn")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if eval_fraction > 0 and len(examples) > 1:
        n_eval = min(eval_max_examples, max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return Dataset([examples[i] for i in train_idx], [examples[i] for i in eval_idx],
                   file_sha256(path), n_trunc, n_drop)


# ---- batch plan ---------------------------------------------------------------------------------

def plan_epoch(lengths: list[int], epoch: int, seed: int, effective_batch: int,
               micro_batch: int, group_steps: int = 16) -> list[list[list[int]]]:
    """Example indices for each optimizer step of one epoch: steps → micro-steps → global batch.

    A global micro-batch (`micro_batch` = per-process batch × world size) is split between ranks
    by `rank_slice`, so N processes × batch b see exactly what 1 process × batch N·b sees.
    Length grouping: a shuffled window of `group_steps` steps is sorted by length and cut into
    steps, so a batch pads little; the steps are shuffled again so lengths are not ordered in
    time. The incomplete last step of an epoch is dropped (another epoch reshuffles).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    n_steps = len(order) // effective_batch
    order = order[:n_steps * effective_batch]
    window = effective_batch * group_steps
    steps = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        for s in range(0, len(chunk), effective_batch):
            step = chunk[s:s + effective_batch]
            steps.append([step[m:m + micro_batch] for m in range(0, effective_batch, micro_batch)])
    rng.shuffle(steps)
    return steps


def rank_slice(global_micro: list[int], rank: int, world_size: int) -> list[int]:
    per = len(global_micro) // world_size
    return global_micro[rank * per:(rank + 1) * per]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; padding is never a target."""
    width = max(len(e.input_ids) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        tokens[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return tokens, labels


