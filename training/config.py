"""Training configuration: defaults for the small default model, recipe files, CLI overrides.

Precedence: dataclass defaults < `--recipe FILE` (JSON object of these fields) < explicit flags.
The resolved config is stored in the adapter's metadata, so every file says how it was made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).parent / "recipes"


METHODS = ("llama-adapter", "llama-adapter-visual", "lora", "prefix-tuning")
VISUAL_METHOD = "llama-adapter-visual"
# Base learning rate per method when neither --lr nor blr is given (lr = blr × eff batch / 256).
# LoRA's B starts at zero and its delta grows with lr²-like speed: 10× lower than the prompts'.
METHOD_BLR = {"llama-adapter": 0.64, "llama-adapter-visual": 0.64, "lora": 0.064, "prefix-tuning": 0.32}


@dataclass
class TrainConfig:
    model: str = "default"
    method: str = "llama-adapter"        # METHODS: which member of the adapter family to train
    # Adapter shape. The paper's 7B numbers (K=10, L=30 of 32) live in recipes/; on the 30-layer
    # default model the top 15 layers learned the demo task as well as all 30 did (90% held-out
    # exact match each) at about half the step time (the layers below run once, without autograd).
    adapter_len: int = 10
    adapter_layers: int = 15
    gate_kind: str = "per_head"          # "per_head" (paper) or "scalar" (PEFT)
    # LoRA (--method lora): rank, alpha (scaling alpha/rank, or alpha/√rank with rsLoRA), targets;
    # it adapts the top adapter_layers layers. Prefix tuning uses adapter_len as its prefix length
    # P and adapts every layer.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_rslora: bool = False
    lora_targets: tuple[str, ...] = ("q", "v")
    prompt_init_std: float = 0.02
    # Image adapters (--method llama-adapter-visual): the encoder hidden states whose class tokens
    # make the image feature (None = four evenly spaced, ending at the last: 6,12,18,24 for CLIP-L),
    # and the projection's learning rate relative to the prompts' (it sums over F features, so an
    # equal step would move its output ~F times further than a prompt moves).
    feature_layers: tuple[int, ...] | None = None
    visual_proj_lr_ratio: float = 0.05
    # Optimisation (paper: AdamW betas (0.9, 0.95), wd 0.02, lr = blr * eff_batch / 256).
    epochs: float = 6.0
    max_steps: int | None = None         # overrides epochs: the schedule spans exactly this many steps
    # The paper's blr (9e-3, in recipes/) is for ~8K steps; a few-hundred-step run needs a larger
    # one: 0.64 gives lr 2e-2 at effective batch 8, which on the demo task reached a lower eval
    # loss than 5e-3 and 1e-2 in the same number of steps.
    blr: float | None = None             # None = METHOD_BLR[method] (0.64 for llama-adapter)
    lr: float | None = None              # absolute lr; None = blr * effective batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.5
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = None       # max global grad norm; None = off (as in the paper)
    batch_size: int = 8                  # per process
    grad_accum: int = 1
    max_len: int = 512
    # Held-out evaluation split carved from --data (deterministic by seed).
    eval_fraction: float = 0.05
    eval_max_examples: int = 200
    eval_every: int = 50                 # optimizer steps; 0 = only at the end
    checkpoint_every: int = 50           # optimizer steps; 0 = only at the end
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        self.lora_targets = tuple(self.lora_targets)
        if self.feature_layers is not None:
            self.feature_layers = tuple(self.feature_layers)
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (1 <= self.lora_rank <= 128, "lora_rank must be in [1, 128]"),
            (bool(self.lora_targets) and set(self.lora_targets) <= {"q", "k", "v", "o", "gate", "up", "down"},
             "lora_targets must be a non-empty subset of q, k, v, o, gate, up, down"),
            (self.adapter_len >= 1, "adapter_len must be >= 1"),
            (self.adapter_layers >= 1, "adapter_layers must be >= 1"),
            (self.gate_kind in ("per_head", "scalar"), "gate_kind must be 'per_head' or 'scalar'"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.blr is None or self.blr > 0, "blr must be > 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_len >= 2, "max_len must be >= 2"),
            (0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every/checkpoint_every must be >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or null"),
            (self.feature_layers is None or (len(self.feature_layers) > 0 and list(self.feature_layers) == sorted(
                set(self.feature_layers)) and self.feature_layers[0] >= 0),
             "feature_layers must be ascending, distinct, non-negative encoder layer numbers"),
            (self.visual_proj_lr_ratio > 0, "visual_proj_lr_ratio must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"training config: {message}")

    def resolved_feature_layers(self, n_encoder_layers: int) -> tuple[int, ...]:
        if self.feature_layers is not None:
            return tuple(self.feature_layers)
        return tuple(sorted({max(1, round(n_encoder_layers * i / 4)) for i in (1, 2, 3, 4)}))

    def effective_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    def peak_lr(self, world_size: int) -> float:
        blr = self.blr if self.blr is not None else METHOD_BLR[self.method]
        return self.lr if self.lr is not None else blr * self.effective_batch(world_size) / 256

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["lora_targets"] = list(self.lora_targets)
        if self.feature_layers is not None:
            d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
        merged = (base or cls()).to_dict()
        merged.update(d)
        return cls(**merged)


def load_recipe(path_or_name: str) -> dict[str, Any]:
    """A recipe is a JSON object of TrainConfig fields; a bare name means training/recipes/NAME.json."""
    path = Path(path_or_name)
    if not path.exists() and (RECIPES_DIR / f"{path_or_name}.json").exists():
        path = RECIPES_DIR / f"{path_or_name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe not found: {path_or_name}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"recipe {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: must be a JSON object of training settings")
    data.pop("_comment", None)
    return data
