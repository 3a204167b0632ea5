"""`adapter-server generate`: one prompt through the batched engine (base model or one adapter file)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

from model.weight_modes import DEFAULT_CPU_WEIGHTS, WEIGHT_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate a completion for one prompt",
        description="Generate a completion for one prompt with the base model or one adapter file.")
    p.add_argument("--prompt", required=True, help="prompt text (tokenized as the model's tokenizer config says)")
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), an HF or Meta checkpoint directory, or a .gguf file")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=DEFAULT_CPU_WEIGHTS,
                   help=f"CPU weight format (default {DEFAULT_CPU_WEIGHTS}; see serve --help)")
    p.add_argument("--adapter", type=Path, help="adapter file (.safetensors in this project's adapter format)")
    p.add_argument("--vision-model", help="image encoder (HF CLIP directory) an image adapter (llama-adapter-visual) "
                                           "was trained with")
    p.add_argument("--image", type=Path, help="image file (PNG, JPEG, WebP or single-frame GIF) an image adapter "
                                                 "is conditioned on (with --vision-model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as one user turn")
    p.add_argument("--json", action="store_true",
                   help='print {"prompt_token_ids", "token_ids", "logprobs", "text"} as one JSON object')
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from adapters.registry import AdapterRegistry   # noqa: PLC0415 (heavy imports only when used)
    from adapters.store import AdapterStore  # noqa: PLC0415
    from model.loading import load_model  # noqa: PLC0415
    from model.vision import load_vision  # noqa: PLC0415

    from .engine import Engine  # noqa: PLC0415
    from .types import EngineConfig, GenerationRequest, SamplingParams  # noqa: PLC0415

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    params.validate()
    adapter_bytes = args.adapter.read_bytes() if args.adapter is not None else None
    images = (_image_file(args.image),) if args.image is not None else ()
    loaded = load_model(args.model, weights=args.weights)
    vision = load_vision(args.vision_model, "cpu")
    tok = loaded.tokenizer
    prompt_ids = (tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat
                  else tok.encode(args.prompt))
    with tempfile.TemporaryDirectory(prefix="adapter-server-generate-") as tmp:
        registry = adapter = None
        if adapter_bytes is not None:
            # The file goes through the same validation and K/V path as an upload to the server.
            registry = AdapterRegistry(AdapterStore(tmp), loaded.model, loaded.fingerprint, vision=vision)
            adapter = registry.upload("cli", adapter_bytes, source=f"file:{args.adapter.name}").ref
        config = EngineConfig(max_batch=1, max_queue=1, max_tokens_per_step=512,
                              max_seq_len=min(len(prompt_ids) + params.max_new_tokens, loaded.config.max_seq_len))
        engine = Engine(loaded, registry, config, vision=vision)
        try:
            handle = engine.submit(GenerationRequest(prompt_ids, params, adapter=adapter, images=images))
            # The engine steps on this thread, the one that loaded the model (Engine.run_here);
            # a thread that runs no torch work prints the stream.
            printer = threading.Thread(target=_print_stream, args=(handle, args.json))
            printer.start()
            engine.run_here(lambda: False)      # returns once the request is done
            printer.join()
            result = handle.wait()
        finally:
            engine.shutdown(graceful=False)
    if args.json:
        print(json.dumps({"prompt_token_ids": prompt_ids, "token_ids": result.token_ids,
                          "logprobs": result.logprobs, "text": result.text}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


def _image_file(path: Path):
    """The image as the server would take it (same formats and pixel limit; the type comes from the bytes)."""
    from .images import ImageError, decode_image  # noqa: PLC0415
    from .routes_common import ServerSettings  # noqa: PLC0415

    try:
        return decode_image(path.read_bytes(), None, ServerSettings.max_image_pixels, "--image")
    except ImageError as e:
        raise SystemExit(f"{path}: {e.message}") from None


def _print_stream(handle, quiet: bool) -> None:
    try:
        for event in handle:
            if not quiet:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except Exception:   # noqa: BLE001 (a failed request is reported once, by handle.wait())
        return
