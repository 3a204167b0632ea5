"""`adapter-server train ...` and `torchrun -m training ...`: one set of flags, one run function."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from .config import METHOD_BLR, METHODS, VISUAL_METHOD, TrainConfig, load_recipe

ADMIN_TOKEN_ENV = "ADAPTER_SERVER_ADMIN_TOKEN"
log = logging.getLogger("training")

# flag dest → TrainConfig field; None means "not given", so recipe/defaults stay.
_CONFIG_FLAGS = ("model", "method", "epochs", "max_steps", "lr", "batch_size", "grad_accum", "adapter_len",
                 "adapter_layers", "lora_rank", "lora_alpha", "lora_rslora", "lora_targets", "seed", "eval_every",
                 "max_len", "feature_layers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--data", type=Path, required=True,
                   help="Alpaca JSON/JSONL ({instruction, input, output}) or chat JSONL ({messages}); "
                        "image instructions add {image: path relative to the file} (--method llama-adapter-visual)")
    p.add_argument("--out", type=Path, help="write the adapter file here")
    p.add_argument("--name", help="store the adapter under this name (in --store, or on --server)")
    p.add_argument("--model", help=f"base model: 'default' or a model path (default {d.model!r})")
    p.add_argument("--method", choices=METHODS,
                   help=f"adapter kind to train (default {d.method}): LLaMA-Adapter prompts and gates, the "
                        "image-conditioned LLaMA-Adapter (needs --vision-model and image data), LoRA, or prefix tuning")
    p.add_argument("--epochs", type=float, help=f"passes over the data (default {d.epochs:g})")
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--lr", type=float, help="peak learning rate (default blr × effective batch / 256, blr "
                                            + ", ".join(f"{m} {b:g}" for m, b in METHOD_BLR.items()) + ")")
    p.add_argument("--batch-size", type=int, help=f"examples per process per micro-step (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro-steps per optimizer step (default {d.grad_accum})")
    p.add_argument("--adapter-len", type=int,
                   help=f"prompt length K, or prefix length P for prefix tuning (default {d.adapter_len})")
    p.add_argument("--adapter-layers", type=int,
                   help=f"adapt the top L layers (default {d.adapter_layers}; prefix tuning: every layer)")
    p.add_argument("--lora-rank", type=int, help=f"LoRA rank r, at most 128 (default {d.lora_rank})")
    p.add_argument("--lora-alpha", type=float, help=f"LoRA alpha: scaling alpha/r (default {d.lora_alpha:g})")
    p.add_argument("--lora-rslora", action="store_const", const=True,
                   help="rank-stabilised LoRA: scaling alpha/sqrt(r)")
    p.add_argument("--lora-targets", type=lambda s: tuple(s.split(",")),
                   help=f"projections LoRA adapts, comma-separated from q,k,v,o,gate,up,down "
                        f"(default {','.join(d.lora_targets)})")
    p.add_argument("--vision-model", type=Path, metavar="DIR",
                   help="image encoder for llama-adapter-visual: an HF CLIP (vision) directory, frozen; the "
                        "adapter records its fingerprint and is served only with the same encoder")
    p.add_argument("--feature-layers", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="encoder hidden states (0 = embeddings) whose class tokens make the image feature, "
                        "comma-separated (default: four evenly spaced, the last one included)")
    p.add_argument("--seed", type=int, help=f"seed for init, data split and order (default {d.seed})")
    p.add_argument("--resume", type=Path, metavar="DIR",
                   help="checkpoint directory: continue from its checkpoint if present, save there")
    p.add_argument("--eval-every", type=int, help=f"eval loss every N steps, 0 = at the end (default {d.eval_every})")
    p.add_argument("--max-len", type=int, help=f"truncate examples to N tokens (default {d.max_len})")
    p.add_argument("--recipe", help="JSON file of training settings (or a name in training/recipes/, "
                                     "e.g. alpaca_7b_8xa100); flags override it")
    p.add_argument("--backend", choices=("nccl", "gloo"),
                   help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)")
    p.add_argument("--store", type=Path, help="adapter store directory for --name (default: the server's)")
    p.add_argument("--server", metavar="URL", help="upload the adapter to this running server as --name")
    p.add_argument("--admin-token", help=f"the server's admin token (default ${ADMIN_TOKEN_ENV})")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an adapter (LLaMA-Adapter, image LLaMA-Adapter, LoRA, "
                                            "prefix tuning) on instruction data",
                              description="Train an adapter on a frozen base model: adaption prompts and "
                                          "gates, LoRA, or prefix tuning (--method). "
                                          "Multi-process: torchrun --nproc_per_node N -m training ...")
    add_arguments(p)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.from_dict(load_recipe(args.recipe)) if args.recipe else TrainConfig()
    overrides = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    return TrainConfig.from_dict(overrides, base=cfg)


def _check_destinations(args: argparse.Namespace) -> None:
    if args.out is None and args.name is None:
        raise ValueError("say where the adapter goes: --out FILE and/or --name NAME")
    if (args.server or args.store) and not args.name:
        raise ValueError("--store and --server need --name")
    if args.server and not (args.admin_token or os.environ.get(ADMIN_TOKEN_ENV)):
        raise ValueError(f"--server needs --admin-token (or ${ADMIN_TOKEN_ENV})")
    if args.name:
        from adapters.names import check_name  # noqa: PLC0415
        check_name(args.name)   # fail before training, not after


def run(args: argparse.Namespace) -> int:
    _check_destinations(args)
    cfg = resolve_config(args)
    # Heavy imports here so `adapter-server --help` stays fast.
    from model.loading import load_model  # noqa: PLC0415

    from . import distributed  # noqa: PLC0415
    from .data import load_dataset  # noqa: PLC0415
    from .loop import train  # noqa: PLC0415

    ctx = distributed.setup(args.backend)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        loaded = load_model(cfg.model, device=ctx.device)
        data = load_dataset(args.data, loaded.tokenizer, cfg.max_len, cfg.eval_fraction,
                            cfg.eval_max_examples, cfg.seed)
        vision, images = _image_inputs(args, cfg, data, ctx)
        if ctx.is_main:
            log.info("data %s: %d train / %d eval examples (%d truncated to %d tokens, %d dropped)",
                     args.data, len(data.train), len(data.eval), data.n_truncated, cfg.max_len, data.n_dropped)
        checkpoint_dir = args.resume or _default_checkpoint_dir(args)
        if ctx.is_main and args.resume is None:
            log.info("checkpoints in %s (pass --resume %s to continue an interrupted run)",
                     checkpoint_dir, checkpoint_dir)
        pad_id = loaded.tokenizer.eos_id if loaded.tokenizer.eos_id is not None else 0
        started = time.perf_counter()
        result = train(cfg, loaded.model, data, ctx, pad_id, checkpoint_dir, resume=args.resume is not None,
                       images=images)
        if ctx.is_main:   # the other ranks are done: nothing after training needs them
            _publish(args, cfg, loaded, data, result, ctx.world_size, checkpoint_dir,
                     time.perf_counter() - started, vision)
    finally:
        ctx.close()
    return 0


def _image_inputs(args: argparse.Namespace, cfg: TrainConfig, data, ctx):
    """(encoder, each example's image feature) for an image adapter; (None, None) otherwise."""
    visual = cfg.method == VISUAL_METHOD
    if data.has_images != visual:
        raise ValueError(f"{args.data} has images: train an image adapter with --method {VISUAL_METHOD} "
                         "--vision-model DIR" if data.has_images else
                         f"--method {VISUAL_METHOD} needs image-instruction data ({{image, instruction, output}})")
    if not visual:
        return None, None
    if args.vision_model is None:
        raise ValueError(f"--method {VISUAL_METHOD} needs --vision-model DIR (an HF CLIP vision model)")
    from model.vision import check_feature_layers, load_vision  # noqa: PLC0415

    from .model import ImageFeatures, image_features  # noqa: PLC0415

    vision = load_vision(args.vision_model, ctx.device)
    layers = cfg.resolved_feature_layers(vision.config.num_hidden_layers)
    check_feature_layers(layers, vision.config)
    started = time.perf_counter()
    images = ImageFeatures(image_features(vision, data.train, layers), image_features(vision, data.eval, layers),
                           layers, vision.fingerprint)
    if ctx.is_main:
        log.info("image encoder %s (%s): features of layers %s (%d values per image) for %d images in %.1fs",
                 args.vision_model, vision.describe(), ",".join(map(str, layers)), images.train.shape[1],
                 len({e.image for e in data.train + data.eval}), time.perf_counter() - started)
    return vision, images


def _default_checkpoint_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out.with_name(args.out.name + ".ckpt")
    return Path.cwd() / f"{args.name}.ckpt"


def _publish(args, cfg: TrainConfig, loaded, data, result, world_size: int, checkpoint_dir: Path,
             seconds: float, vision=None) -> None:
    from adapters.format import metadata_for  # noqa: PLC0415
    from adapters.importers import adapter_file_bytes  # noqa: PLC0415
    from adapters.validation import write_validated_adapter  # noqa: PLC0415

    from . import publish  # noqa: PLC0415
    from .plot import plot_losses  # noqa: PLC0415

    extra = {"recipe": cfg.to_dict(), "base_model": loaded.name, "data_file": args.data.name,
             "data_sha256": data.sha256, "train_examples": len(data.train), "eval_examples": len(data.eval),
             "steps": result.steps, "world_size": world_size,
             "final_train_loss": round(result.final_train_loss, 5),
             "final_eval_loss": None if result.final_eval_loss is None else round(result.final_eval_loss, 5),
             "train_seconds": round(seconds, 1)}
    meta = metadata_for(result.weights, loaded.model, "trained", extra, loaded.fingerprint)
    eval_text = "n/a" if result.final_eval_loss is None else f"{result.final_eval_loss:.4f}"
    summary = (f"{result.steps} steps in {seconds:.0f}s ({result.tokens_per_second:.0f} tok/s); "
               f"final train loss {result.final_train_loss:.4f}, eval loss {eval_text}")
    plot_path = (args.out.with_suffix(".loss.png") if args.out is not None
                 else checkpoint_dir / "loss.png")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(result.history, plot_path, f"{loaded.name} · {args.data.name}\n{summary}")
    print(summary)
    print(f"loss curve: {plot_path}")
    if args.out is not None:
        write_validated_adapter(args.out, result.weights, meta, loaded.model, loaded.fingerprint, vision)
        print(f"adapter: {args.out} ({result.weights.param_count()} parameters)")
    if args.name:
        data_bytes = adapter_file_bytes(result.weights, meta)
        if args.store is not None or not args.server:
            ref = publish.add_to_store(args.store, args.name, data_bytes, loaded, vision)
            print(f"stored as {ref}")
        if args.server:
            token = args.admin_token or os.environ[ADMIN_TOKEN_ENV]
            ref = publish.upload_to_server(args.server, token, args.name, data_bytes)
            print(f"uploaded to {args.server} as {ref}: serving now")
