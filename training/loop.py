"""The training loop: AdamW on the adapter only, warmup + half-cycle cosine, gradient
accumulation, data-parallel gradient sums, periodic eval, resumable checkpoints.

Loss normalisation: every micro-batch's summed token loss is divided by the number of target
tokens of the whole optimizer step (all micro-batches, all ranks), and gradients are summed
over ranks. The step's gradient is then the token-mean over the effective batch however it is
split, which is what makes N processes × batch b equal 1 process × batch N·b.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from model.fingerprint import base_fingerprint

from . import checkpoint
from .config import TrainConfig
from .data import Dataset, Example, collate, plan_epoch, rank_slice
from .distributed import DistContext
from .model import ImageFeatures, LowerStates, Trainable, freeze, make_trainable

log = logging.getLogger("training")


@dataclass
class TrainResult:
    weights: Any                       # AdapterWeights | LoraWeights | PrefixWeights; detached, CPU float32
    steps: int
    final_train_loss: float
    final_eval_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int

    @classmethod
    def for_run(cls, cfg: TrainConfig, n_train: int, world_size: int) -> "Schedule":
        eff = cfg.effective_batch(world_size)
        per_epoch = n_train // eff
        if per_epoch == 0:
            raise ValueError(f"{n_train} training examples are fewer than one effective batch "
                             f"({eff} = batch {cfg.batch_size} × grad-accum {cfg.grad_accum} × "
                             f"{world_size} processes); lower --batch-size or --grad-accum")
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        warmup = min(round(cfg.warmup_epochs * per_epoch), total - 1)
        return cls(total, warmup, per_epoch)

    def lr_factor(self, step: int, min_ratio: float) -> float:
        """Linear warmup to 1, then half a cosine down to min_ratio at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = (step - self.warmup_steps) / span
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, base, data: Dataset, ctx: DistContext, pad_id: int,
          checkpoint_dir: Path | None = None, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
          images: ImageFeatures | None = None) -> TrainResult:
    """Train an adapter on `base` (frozen here). Returns the final weights on every rank.
    `images`: the examples' image features, for an image adapter (llama-adapter-visual).

    Checkpoints go to `checkpoint_dir`; with `resume` the run continues from the one there
    (if any). `on_step` sees each step's record (step, train_loss, lr, eval_loss...).
    """
    torch.manual_seed(cfg.seed)
    freeze(base)
    device = ctx.device
    adapter = make_trainable(cfg, base.config, images).to(device)
    sched = Schedule.for_run(cfg, len(data.train), ctx.world_size)
    eff = cfg.effective_batch(ctx.world_size)
    peak_lr = cfg.peak_lr(ctx.world_size)
    params = list(adapter.parameters())
    proj = [p for n, p in adapter.named_parameters() if n.startswith("proj_")]
    groups = [{"params": [p for n, p in adapter.named_parameters() if not n.startswith("proj_")]}]
    if proj:   # the image projection sums over F features: it gets a smaller step (config)
        groups.append({"params": proj, "lr": peak_lr * cfg.visual_proj_lr_ratio})
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: sched.lr_factor(s, cfg.min_lr / peak_lr))
    # bf16 autocast on CUDA (the frozen base is loaded in bf16 there); plain fp32 on CPU.
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    run_key = {"data_sha256": data.sha256, "base_fingerprint": base_fingerprint(base),
               "effective_batch": eff, "total_steps": sched.total_steps,
               "encoder_fingerprint": images.encoder_fingerprint if images is not None else None,
               "config": {k: v for k, v in cfg.to_dict().items()
                          if k not in ("eval_every", "checkpoint_every", "model")}}
    step, history = 0, []
    saved = checkpoint.load(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if saved is not None:
        checkpoint.check_same_run(saved["run_key"], run_key, checkpoint_dir)
        adapter.load_state_dict(saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.restore_rng(saved["rng"])
        step, history = saved["step"], list(saved["history"])
        if ctx.is_main:
            log.info("resuming from %s at step %d/%d", checkpoint_dir, step, sched.total_steps)

    def save_checkpoint() -> None:
        if checkpoint_dir is None or not ctx.is_main:
            return
        checkpoint.save(checkpoint_dir, {
            "run_key": run_key, "adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": checkpoint.rng_state(),
            "history": history})

    if ctx.is_main:
        log.info("training %d adapter parameters on %d examples (%d held out): %d steps, "
                 "effective batch %d, peak lr %.3g, %d warmup steps",
                 sum(p.numel() for p in params), len(data.train), len(data.eval),
                 sched.total_steps, eff, peak_lr, sched.warmup_steps)
    passes = sched.total_steps * eff / len(data.train)
    element_size = base.tok_embeddings.weight.element_size()
    keep = LowerStates.worth_keeping(adapter, data.train + data.eval, base.config.dim, element_size, passes)
    train_states = LowerStates(adapter, base, data.train, pad_id, device, autocast, keep, cfg.batch_size)
    eval_states = LowerStates(adapter, base, data.eval, pad_id, device, autocast, keep, cfg.batch_size)
    if ctx.is_main and keep:
        log.info("layers 0-%d do not see the adapter: their outputs are computed once per example",
                 adapter.first_layer - 1)
    lengths = [len(e.input_ids) for e in data.train]
    micro = cfg.batch_size * ctx.world_size
    plans: dict[int, list[list[list[int]]]] = {}
    bar = tqdm(total=sched.total_steps, initial=step, disable=not (progress and ctx.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    t_start, tokens_done = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    while step < sched.total_steps:
        epoch, index = divmod(step, sched.steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(lengths, epoch, cfg.seed, eff, micro)}
        step_plan = plans[epoch][index]
        step_examples = [data.train[i] for m in step_plan for i in m]
        n_targets = sum(e.n_targets for e in step_examples)
        loss_sum.zero_()
        for global_micro in step_plan:
            indices = rank_slice(global_micro, ctx.rank, ctx.world_size)
            tokens, labels = collate([data.train[i] for i in indices], pad_id)
            tokens, labels = tokens.to(device), labels.to(device)
            lower = train_states.get(indices, tokens)
            features = images.train[indices] if images is not None else None
            with autocast:
                loss = adapter.summed_loss(base, lower, labels, features)
            (loss / n_targets).backward()
            loss_sum += loss.detach()
        ctx.all_reduce_sum([*(p.grad for p in params), loss_sum])
        grad_norm = None
        if cfg.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_done += sum(len(e.input_ids) for e in step_examples)
        record: dict[str, Any] = {"step": step, "train_loss": float(loss_sum) / n_targets, "lr": lr}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if step == sched.total_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            if data.eval:
                record["eval_loss"] = evaluate(adapter, base, data.eval, eval_states, ctx, cfg.batch_size,
                                               pad_id, autocast, images.eval if images is not None else None)
        history.append(record)
        elapsed = time.perf_counter() - t_start
        bar.update(1)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{tokens_done / elapsed:.0f}",
                        **({"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}))
        if step == sched.total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint()
        if on_step is not None:
            on_step(record)
    bar.close()
    elapsed = time.perf_counter() - t_start

    last = history[-min(10, len(history)):]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    return TrainResult(adapter.export(), step, sum(r["train_loss"] for r in last) / len(last),
                       evals[-1] if evals else None, history, elapsed,
                       tokens_done / elapsed if elapsed > 0 else 0.0)


@torch.no_grad()
def evaluate(adapter: Trainable, base, examples: list[Example], states: LowerStates,
             ctx: DistContext, batch_size: int, pad_id: int, autocast,
             features: torch.Tensor | None = None) -> float:
    """Token-mean loss over the held-out examples, sharded across ranks (`features`: their image
    features, for an image adapter)."""
    mine = sorted(range(ctx.rank, len(examples), ctx.world_size), key=lambda i: len(examples[i].input_ids))
    totals = torch.zeros(2, device=ctx.device, dtype=torch.float64)   # [loss sum, targets]
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        tokens, labels = collate([examples[i] for i in indices], pad_id)
        tokens, labels = tokens.to(ctx.device), labels.to(ctx.device)
        lower = states.get(indices, tokens)
        with autocast:
            totals[0] += adapter.summed_loss(base, lower, labels,
                                             features[indices] if features is not None else None).double()
        totals[1] += sum(examples[i].n_targets for i in indices)
    ctx.all_reduce_sum([totals])
    return float(totals[0] / totals[1])
