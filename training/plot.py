"""Loss-curve PNG (train per step, eval at its checkpoints), drawn without a display."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Figure + Agg canvas directly: no pyplot, so no global backend state and no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_losses(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["train_loss"] for r in history], lw=0.8, alpha=0.5, color="tab:blue",
            label="train (per step)")
    window = max(1, len(history) // 20)
    if window > 1:
        smooth = [sum(r["train_loss"] for r in history[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(history))]
        ax.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"train ({window}-step mean)")
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", lw=1.6, ms=4, label="eval (held out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean, log scale)")
    ax.set_yscale("log")   # the late, small improvements are the interesting part
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
