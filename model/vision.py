"""CLIP ViT image encoder in plain torch, loading HF CLIP vision weights (frozen feature extractor).

The multimodal LLaMA-Adapter (arXiv 2303.16199, §4.3) takes multi-scale global features of a
frozen CLIP encoder: the class token of some of its layers, concatenated. This module computes
exactly HF `CLIPVisionModel(output_hidden_states=True)` hidden states: a bias-free patch
convolution, a class token, learned position embeddings, `pre_layrnorm`, then pre-LN encoder
layers (`hidden_states[0]` is the normalised embeddings, `hidden_states[i]` layer i's output).

A directory holds `config.json` (a CLIPVisionModel config, or a full CLIPModel one with a nested
`vision_config`) and `*.safetensors` weights under `vision_model.*` (text tower and projections
of a full CLIPModel checkpoint are ignored). `preprocessor_config.json`, when present, gives the
resize, crop and normalisation (otherwise CLIP's own defaults for the config's image size).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

# CLIPVisionConfig defaults: older CLIPModel configs leave out what equals them.
_CONFIG_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# OpenAI CLIP's normalisation (CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PREFIX = "vision_model."


class VisionModelError(ValueError):
    """The directory is not a loadable CLIP vision model; the message says why."""


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Preprocessing (CLIPImageProcessor): shortest side → resize_shortest (bicubic), centre crop
    # crop_size × crop_size, /255, then (x - mean) / std per channel.
    resize_shortest: int = 224
    crop_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    name: str = field(default="clip-vision", compare=False)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise VisionModelError(f"hidden_act {self.hidden_act!r} not supported ({', '.join(_ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
            raise VisionModelError("hidden_size must divide by num_attention_heads and image_size by patch_size")
        if self.resize_shortest < self.crop_size:
            raise VisionModelError(f"the preprocessor resizes to {self.resize_shortest} px, below its "
                                   f"{self.crop_size} px crop (padding is not supported)")
        if self.crop_size != self.image_size:
            raise VisionModelError(f"the preprocessor crops {self.crop_size} px but the encoder takes "
                                   f"{self.image_size} px images")

    @classmethod
    def from_hf(cls, config: dict, preprocessor: dict | None = None, name: str = "clip-vision") -> "VisionConfig":
        """From an HF CLIP `config.json` (flat CLIPVisionConfig or CLIPConfig with `vision_config`)
        and, optionally, its `preprocessor_config.json`."""
        vision = config.get("vision_config", config) if isinstance(config, dict) else None
        if not isinstance(vision, dict):
            raise VisionModelError("config.json is not a CLIP (vision) config")
        values = {k: vision.get(k, d) for k, d in _CONFIG_DEFAULTS.items()}
        pre = preprocessor or {}
        size = pre.get("size", values["image_size"])
        crop = pre.get("crop_size", values["image_size"])
        try:
            values["resize_shortest"] = int(size["shortest_edge"] if isinstance(size, dict) else size)
            values["crop_size"] = int(crop["height"] if isinstance(crop, dict) else crop)
            if isinstance(crop, dict) and crop.get("width", crop["height"]) != crop["height"]:
                raise VisionModelError(f"non-square crop_size {crop} is not supported")
            mean = tuple(float(x) for x in pre.get("image_mean", CLIP_MEAN))
            std = tuple(float(x) for x in pre.get("image_std", CLIP_STD))
            ints = {k: int(values[k]) for k in _CONFIG_DEFAULTS if k not in ("hidden_act", "layer_norm_eps")}
        except (KeyError, TypeError, ValueError) as e:
            raise VisionModelError(f"bad CLIP config or preprocessor config: {e}") from None
        if len(mean) != 3 or len(std) != 3:
            raise VisionModelError("image_mean and image_std need three values (RGB)")
        return cls(**ints, hidden_act=str(values["hidden_act"]), layer_norm_eps=float(values["layer_norm_eps"]),
                   resize_shortest=values["resize_shortest"], crop_size=values["crop_size"],
                   image_mean=mean, image_std=std, name=name)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class _EncoderLayer(nn.Module):
    """Pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x)); biases everywhere, as in CLIP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1 = nn.Linear(d, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.layer_norm1(x)
        q, k, v = (p(h).view(b, t, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v)          # no mask: every patch sees every patch
        x = x + self.out_proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


# Our parameter name → HF's (under `vision_model.`); layers map 1:1 below `encoder.layers.{i}.`.
_HF_LAYER_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                   "out_proj": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
                   "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2"}


def _hf_name(ours: str) -> str:
    if ours.startswith("layers."):
        _, i, module, param = ours.split(".")
        return f"{_PREFIX}encoder.layers.{i}.{_HF_LAYER_NAMES[module]}.{param}"
    return _PREFIX + {"class_embedding": "embeddings.class_embedding",
                      "patch_embedding.weight": "embeddings.patch_embedding.weight",
                      "position_embedding.weight": "embeddings.position_embedding.weight"}.get(ours, ours)


class VisionTower(nn.Module):
    """The CLIP ViT encoder (no post-layernorm / projection: the adapter reads hidden states)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Embedding(cfg.n_patches + 1, d)
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.fingerprint = ""      # set by from_dir / seal (sha256 of config + weights)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def describe(self) -> str:
        c = self.config
        return (f"CLIP ViT, {c.num_hidden_layers} layers, width {c.hidden_size}, {c.image_size} px images in "
                f"{c.patch_size} px patches, fingerprint {self.fingerprint}")

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """[B, 3, S, S] → the embeddings output then each layer's output, each [B, 1 + patches, width]
        (`upto`: stop after that layer; the ones above are not run)."""
        ref = self.class_embedding
        x = self.patch_embedding(pixel_values.to(ref.dtype)).flatten(2).transpose(1, 2)
        cls = ref.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight
        states = [self.pre_layrnorm(x)]
        for layer in self.layers[:upto]:
            states.append(layer(states[-1]))
        return states

    def global_features(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """The paper's multi-scale global feature: each chosen hidden state's class token,
        concatenated → [B, len(layers) * width] (layer numbers index `hidden_states`)."""
        check_feature_layers(layers, self.config)
        states = self.hidden_states(pixel_values, upto=max(layers))
        return torch.cat([states[i][:, 0] for i in layers], dim=-1)

    def seal(self) -> "VisionTower":
        """Freeze (eval, no grads) and compute the fingerprint of the current weights."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.fingerprint = vision_fingerprint(self.config, self.state_dict())
        return self

    @classmethod
    def random(cls, cfg: VisionConfig, seed: int = 0) -> "VisionTower":
        """A seeded random tower: a fixed (untrained) feature extractor for tests and the synthetic
        image demo. Patch projections are scaled so every patch embedding is O(1) from the first
        layer on (random convolution features of colours and edges, mixed by attention)."""
        g = torch.Generator().manual_seed(seed)
        tower = cls(cfg)
        with torch.no_grad():
            for name, p in tower.named_parameters():
                if "layer_norm" in name or "layrnorm" in name:
                    continue                      # LayerNorm: weight 1, bias 0
                fan_in = p[0].numel() if p.dim() > 1 else cfg.hidden_size
                std = 0.02 if name.startswith("position") else fan_in ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std if p.dim() > 1 or name == "class_embedding"
                        else torch.zeros(p.shape))
        return tower.seal()

    def save(self, path: str | Path) -> Path:
        """Write HF layout (CLIPVisionModel config.json, model.safetensors with HF names,
        preprocessor_config.json) so from_dir and transformers both read it."""
        from safetensors.torch import save_file  # noqa: PLC0415

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.config
        config = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                  **{k: getattr(c, k) for k in _CONFIG_DEFAULTS}, "projection_dim": c.hidden_size,
                  "torch_dtype": "float32"}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        preprocessor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                        "size": {"shortest_edge": c.resize_shortest}, "resample": 3, "do_center_crop": True,
                        "crop_size": {"height": c.crop_size, "width": c.crop_size}, "do_rescale": True,
                        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(c.image_mean),
                        "image_std": list(c.image_std), "do_convert_rgb": True}
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        save_file({_hf_name(n): t.detach().float().contiguous().cpu() for n, t in self.state_dict().items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    @classmethod
    def from_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> "VisionTower":
        path = Path(path)
        cfg = read_vision_config(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise VisionModelError(f"{path}: no *.safetensors weights (only safetensors are loaded)")
        with torch.device("meta"):
            tower = cls(cfg)
        wanted = {_hf_name(n): n for n in tower.state_dict()}
        state: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key in wanted:
                        state[wanted[key]] = st.get_tensor(key).to(dtype)
        missing = sorted(set(wanted.values()) - set(state))
        if missing:
            raise VisionModelError(f"{path}: weights missing for {missing[:4]} (HF names "
                                   f"{[_hf_name(n) for n in missing[:2]]})")
        try:
            tower.load_state_dict(state, assign=True, strict=True)
        except RuntimeError as e:   # shape mismatch with config.json
            raise VisionModelError(f"{path}: weights do not match config.json: {e}") from None
        return tower.to(device).seal()


def load_vision(path: str | Path | None, device: str | torch.device = "cpu") -> VisionTower | None:
    """The image encoder `--vision-model` names (None when unset), frozen on `device`: float32 on
    a CPU, bfloat16 on an accelerator, as the base model is by default."""
    if not path:
        return None
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return VisionTower.from_dir(path, dtype=dtype, device=device)


def read_vision_config(path: Path) -> VisionConfig:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise VisionModelError(f"{path}: no config.json (expected an HF CLIP vision model directory)") from None
    except ValueError as e:
        raise VisionModelError(f"{path}/config.json: not JSON ({e})") from None
    pre_path = path / "preprocessor_config.json"
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    return VisionConfig.from_hf(config, preprocessor, name=path.name)


def check_feature_layers(layers: Sequence[int], cfg: VisionConfig) -> None:
    if not layers or any(not 0 <= i <= cfg.num_hidden_layers for i in layers):
        raise ValueError(f"feature layers {list(layers)} must be non-empty and within 0..{cfg.num_hidden_layers} "
                         "(0 = embeddings, i = output of encoder layer i)")


def vision_fingerprint(cfg: VisionConfig, state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex, 16 chars) over what changes the features: shapes, activation, preprocessing and
    a fixed sample of every weight tensor, rounded through bfloat16 so fp32/bf16 copies agree."""
    h = hashlib.sha256()
    h.update(repr((cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.image_size, cfg.patch_size, cfg.hidden_act, cfg.layer_norm_eps, cfg.resize_shortest,
                   cfg.crop_size, cfg.image_mean, cfg.image_std)).encode())
    for name in sorted(state):
        flat = state[name].detach().reshape(-1)
        step = max(1, math.ceil(flat.numel() / 256))
        sample = flat[::step][:256].to(device="cpu", dtype=torch.bfloat16).float() + 0.0   # −0.0 → 0.0
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
