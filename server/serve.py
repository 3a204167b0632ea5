"""`adapter-server serve`: load the base model, open the adapter store, start the engine, serve HTTP.

Every option can also come from an environment variable ADAPTER_SERVER_<OPTION> (dashes become
underscores, e.g. ADAPTER_SERVER_MAX_BATCH); a flag on the command line wins over the variable.
Shutdown (SIGINT/SIGTERM) drains: /ready turns 503 and new generation requests get 503 while
the server keeps answering; requests in flight get --shutdown-grace seconds to finish; the rest
end with an error (a final error event on streams, a 503 JSON error otherwise); then the server
stops listening and the engine stops. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from model.weight_modes import DEFAULT_CPU_WEIGHTS, WEIGHT_CHOICES
from server.types import EngineConfig

ENV_PREFIX = "ADAPTER_SERVER_"
log = logging.getLogger("adapter_server.serve")


def _flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _one_of(*choices: str) -> Callable[[str], str]:
    # A type instead of argparse `choices`: argparse never checks choices on env-var defaults.
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}; got {text!r}")
        return text
    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def _byte_count(text: str) -> int:
    """'8MiB', '500KB', '1000000' → bytes (memory_size without its fraction form)."""
    value = memory_size(text)
    if isinstance(value, float):
        raise argparse.ArgumentTypeError(f"expected bytes like 8MiB or 500KB, got {text!r}")
    return value


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key flags, else the comma-separated keys of ADAPTER_SERVER_API_KEY."""
    if args.api_key:
        return tuple(args.api_key)
    return tuple(k.strip() for k in os.environ.get(env_name("--api-key"), "").split(",") if k.strip())


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def memory_size(text: str) -> int | float:
    """'2GiB', '512MB', '1500000000' → bytes (int); '0.8' → a fraction of free device memory."""
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgtib")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes like 2GiB or 512MB, or a fraction like 0.8; "
                                         f"got {text!r}") from None
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    if unit == "" and 0 < value < 1:
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) or at least 1 byte, got {text!r}")
    return int(value * _UNITS[unit])


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, default: Any, help: str,
         type: Callable[[str], Any] = str, shown: str | None = None, **kw) -> None:
    """An option whose default comes from its environment variable when that is set."""
    env = env_name(flag)
    from_env = os.environ.get(env)

    def parse(text: str):
        source = f" (from {env})" if text == from_env else ""
        try:
            return type(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}{source}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type.__name__}, got {text!r}{source}") from None

    if shown is None:
        shown = "unset" if default is None else str(default)
    parser.add_argument(flag, default=from_env if from_env is not None else default, type=parse,
                        help=f"{help} [env {env}; default: {shown}]", **kw)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the base model and its adapters over HTTP",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add(p, "--model", "default", "base model: 'default' (the embedded SmolLM2-135M-Instruct), an HF or "
         "Meta checkpoint directory, or a .gguf file")
    _add(p, "--store", None, "adapter store directory", shown="the per-user data directory")
    _add(p, "--vision-model", None, "image encoder of image adapters (llama-adapter-visual): an HF CLIP or "
         "CLIP-vision model directory (config.json + safetensors), e.g. openai/clip-vit-large-patch14 as in "
         "the paper", shown="none: image adapters and image inputs are refused")
    _add(p, "--host", "127.0.0.1", "address to listen on (0.0.0.0 accepts remote clients)")
    _add(p, "--port", 8000, "TCP port", type=int)
    _add(p, "--admin-token", None, "bearer token for every /admin route (tenant admin keys live in "
         "--api-keys-file); unset and no keys file = admin API off")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="an inference API key (repeatable; tenant 'default', every adapter); with any key or "
                        "keys file, inference needs 'Authorization: Bearer <key>'. The variable holds "
                        f"comma-separated keys; flags replace it [env {env_name('--api-key')}; default: unset]")
    _add(p, "--api-keys-file", None, "JSON or TOML file of hashed inference keys with tenants, adapter "
         "patterns, limits and tenant admin keys (docs/api-keys.md); re-read when it changes")
    _add(p, "--max-batch", EngineConfig.max_batch, "running sequences, i.e. rows per decode step (the KV cache's blocks "
         "bound them too)", type=_positive(int))
    _add(p, "--max-seq-len", None, "prompt + generated tokens per sequence", type=_positive(int),
         shown="the model's context, at most 4096")
    _add(p, "--kv-cache-memory", None, "KV-cache size: bytes (2GiB, 512MB) or, on CUDA, a fraction of free "
         "device memory (0.8)", type=memory_size,
         shown="CPU: what 8 sequences of the model's context (at most 4096, at least --max-seq-len) need; CUDA: 0.8")
    _add(p, "--no-prefix-cache", False, "do not reuse prompt blocks across requests", type=_flag_bool,
         nargs="?", const=True)
    _add(p, "--cuda-graphs", True, "replay the decode step as CUDA graphs (CUDA)", type=_flag_bool,
         nargs="?", const=True)
    _add(p, "--max-tokens-per-step", EngineConfig.max_tokens_per_step,
         "tokens per step, decode rows included (chunked prefill budget): larger admits more prompt "
         "tokens per step (more throughput and lower TTFT in bursts of prompts) but spaces decode "
         "steps further apart while prompts wait; 512 for steadier decoding",
         type=_positive(int))
    _add(p, "--max-queue", EngineConfig.max_queue, "waiting requests beyond the batch; more get 503 + Retry-After",
         type=_positive(int))
    _add(p, "--device", None, "cpu or cuda", type=_one_of("cpu", "cuda"), metavar="{cpu,cuda}",
         shown="cuda when available")
    _add(p, "--dtype", None, "weights and KV cache dtype", type=_one_of("float32", "bfloat16", "float16"),
         metavar="{float32,bfloat16,float16}", shown="float32 on CPU, bfloat16 on CUDA")
    _add(p, "--weights", None, "CPU weight format: fp32 (the reference), bf16 (oneDNN), int8 / int4 "
         "(weight-only), gguf (a .gguf model's own 4-bit codes; with --model default its GGUF)",
         type=_one_of(*WEIGHT_CHOICES), metavar="{" + ",".join(WEIGHT_CHOICES) + "}",
         shown=f"{DEFAULT_CPU_WEIGHTS} on CPU; CUDA uses --dtype")
    _add(p, "--compile", False, "torch.compile the decode step (CUDA)", type=_flag_bool, nargs="?", const=True)
    _add(p, "--model-id", None, "the base model's id in the OpenAI API", shown="the model's name")
    _add(p, "--default-max-new-tokens", 256, "tokens generated when a request sets no limit",
         type=_positive(int))
    _add(p, "--max-new-tokens-limit", None, "most new tokens one request may ask for; more is refused "
         "with 422 (400 on /v1) naming the field", type=_positive(int), shown="the context length")
    _add(p, "--request-timeout", None, "seconds from submit until a generation request is ended with "
         "504 (streams: a final error event)", type=_positive(float), shown="no deadline")
    _add(p, "--max-body-mb", 4.0, "largest JSON request body; larger ones get 413", type=_positive(float))
    _add(p, "--max-upload-mb", 2048.0, "largest adapter upload (spooled to disk as it arrives, not held in "
         "memory); larger ones get 413. Per kind, validation then caps LLaMA-Adapter and prefix-tuning "
         "files at 64 MB and LoRA files at --max-lora-file-mb", type=_positive(float))
    _add(p, "--max-lora-file-mb", 2048.0, "largest LoRA adapter file (rank 64 on every linear of a 7B "
         "is ~640 MB in fp32); larger ones are refused with 422", type=_positive(float))
    _add(p, "--max-image-bytes", 8 << 20, "largest image one request may carry (encoded bytes: 8MiB, "
         "500KB); larger ones get 413. Inline images also count against --max-body-mb", type=_byte_count,
         shown="8MiB")
    _add(p, "--max-image-pixels", 4096 * 4096, "most pixels (width × height, read from the image header "
         "before decoding) an image may have; more get 413", type=_positive(int), shown="16777216 (4096²)")
    _add(p, "--allow-remote-images", False, "fetch http(s) image URLs (off: only inline data: URLs)",
         type=_flag_bool, nargs="?", const=True)
    _add(p, "--remote-image-timeout", 10.0, "seconds a remote image's whole download may take",
         type=_positive(float))
    _add(p, "--image-feature-cache", 1024, "images whose vision features stay cached by content hash "
         "(LRU), so a repeated image skips the vision tower; 0 = off", type=_non_negative_int)
    _add(p, "--pool-max-adapters", 64, "adapter versions kept resident on the device (LRU)",
         type=_positive(int))
    _add(p, "--pool-max-mb", 2048.0, "device memory for resident adapters", type=_positive(float))
    _add(p, "--max-adapter-len", 256, "largest adapter_len (prompt length K) an upload may have",
         type=_positive(int))
    _add(p, "--max-adapter-kv-mb", 256.0, "largest prompt K/V one adapter version may take on the device "
         "(adapted layers × K × KV heads × head dim × 2)", type=_positive(float))
    _add(p, "--store-poll-interval", 1.0, "seconds between checks for changes other replicas made to a "
         "shared store; 0 = only when a request names an adapter", type=float)
    _add(p, "--shutdown-grace", 30.0, "seconds requests in flight get to finish after SIGTERM/SIGINT "
         "(the rest end with a 503 error)", type=float)
    # The flag's earlier name, which meant the same; kept so existing scripts keep working.
    p.add_argument("--shutdown-timeout", dest="shutdown_grace", type=float, help=argparse.SUPPRESS)
    _add(p, "--log-level", "info", "logging level", type=_one_of("debug", "info", "warning", "error"),
         metavar="{debug,info,warning,error}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from adapters.pool import PoolConfig
    from adapters.registry import AdapterRegistry
    from adapters.store import AdapterStore
    from adapters.validation import ValidationLimits
    from model.loading import inference_weights, load_model
    from model.vision import load_vision
    from server.app import ServerSettings, create_app
    from server.engine import Engine
    from server.replica_watch import StoreWatcher

    logging.getLogger().setLevel(args.log_level.upper())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype) if args.dtype else None

    weights = inference_weights(args.weights, device)
    log.info("loading base model %r on %s%s", args.model, device, f", {weights} weights" if weights else "")
    loaded = load_model(args.model, device=device, dtype=dtype, weights=weights)
    cfg = loaded.config
    model_dtype = next(loaded.model.parameters()).dtype
    log.info("loaded %s from %s: %d layers, dim %d, %d heads (%d KV), vocab %d, context %d, %.1fM params, "
             "%s, fingerprint %s", loaded.name, loaded.path, cfg.n_layers, cfg.dim, cfg.n_heads,
             cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len, cfg.param_count() / 1e6,
             str(model_dtype).removeprefix("torch."), loaded.fingerprint[:16])

    vision = load_vision(args.vision_model, device)
    if vision is not None:
        log.info("image encoder %s: %s", args.vision_model, vision.describe())
    store = AdapterStore(args.store)
    limits = ValidationLimits(max_adapter_len=args.max_adapter_len,
                              max_kv_bytes=int(args.max_adapter_kv_mb * (1 << 20)),
                              max_lora_file_bytes=int(args.max_lora_file_mb * (1 << 20)))
    registry = AdapterRegistry(store, loaded.model, loaded.fingerprint,
                               PoolConfig(max_adapters=args.pool_max_adapters,
                                          max_bytes=int(args.pool_max_mb * (1 << 20))), limits, vision)
    adapters = store.list()
    log.info("adapter store %s: %d adapter(s)%s", store.root, len(adapters),
             (": " + ", ".join(a.latest.ref for a in adapters[:20])) if adapters else "")

    max_seq_len = args.max_seq_len or min(cfg.max_seq_len, EngineConfig.DEFAULT_MAX_SEQ_LEN)
    engine_config = EngineConfig(max_batch=args.max_batch, max_seq_len=max_seq_len,
                                 max_tokens_per_step=max(args.max_tokens_per_step, args.max_batch),
                                 max_queue=args.max_queue, compile=args.compile,
                                 kv_cache_memory=args.kv_cache_memory, prefix_caching=not args.no_prefix_cache,
                                 cuda_graphs=args.cuda_graphs, image_feature_cache=args.image_feature_cache)
    engine = Engine(loaded, registry, engine_config, vision=vision)   # steps on this thread (Engine.run_here)
    watcher = StoreWatcher(registry, args.store_poll_interval).start() if args.store_poll_interval > 0 else None
    stats = engine.stats()
    log.info("engine: batch %d, sequence length %d, queue %d, KV cache %.1f MiB (%d blocks of %d tokens), "
             "prefix cache %s", engine_config.max_batch, engine_config.max_seq_len, engine_config.max_queue,
             stats.kv_cache_bytes / (1 << 20), stats.kv_blocks_total, stats.kv_block_size,
             "on" if engine_config.prefix_caching else "off")

    settings = ServerSettings(
        admin_token=args.admin_token or None, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        default_max_new_tokens=args.default_max_new_tokens, max_new_tokens_limit=args.max_new_tokens_limit,
        request_timeout_s=args.request_timeout, model_id=args.model_id,
        api_keys=api_keys(args), api_keys_file=args.api_keys_file or None,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        allow_remote_images=args.allow_remote_images, remote_image_timeout_s=args.remote_image_timeout)
    app = create_app(engine, registry, loaded, settings)
    keys = app.state.ctx.auth
    log.info("OpenAI model id %r; admin API %s; listening on http://%s:%d", app.state.ctx.model_id,
             "on" if settings.admin_token or keys.keys_file else "off (no --admin-token)", args.host, args.port)
    if keys.configured:
        log.info("inference needs an API key: %s", keys.describe())
    else:
        log.warning("inference is open to anyone who reaches the port: no --api-key or --api-keys-file")
    # By the time uvicorn is told to exit the requests have drained (see _drain): what is left is
    # idle keep-alive connections and answers being written.
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=_WRITE_OUT_S, log_config=None))
    try:
        _serve_until_signalled(server, engine, app.state.ctx, args.shutdown_grace)
    finally:
        engine.shutdown(graceful=True)
        if watcher is not None:
            watcher.stop()
        log.info("stopped")
    return 0


_WRITE_OUT_S = 5.0     # after the grace period: time for stopped requests to write their error


def _drain(server, ctx, grace: float) -> None:
    """Let requests in flight finish for up to `grace` seconds, end the rest with an error,
    then let uvicorn exit. Until then it keeps answering (so /ready says 503 instead of
    refusing connections, and streams can send their last event)."""
    from server.routes_common import SHUTTING_DOWN, ApiError  # noqa: PLC0415

    deadline = time.monotonic() + grace
    while ctx.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    if ctx.in_flight:
        stopped = ctx.stop_all(ApiError(
            503, f"{SHUTTING_DOWN}: the request did not finish within the shutdown grace period of "
                 f"{grace:g} s", "unavailable"))
        log.warning("shutdown grace period over: ending %d request(s) still running", stopped)
        deadline = time.monotonic() + _WRITE_OUT_S
        while ctx.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
    server.should_exit = True


def _serve_until_signalled(server, engine, ctx, grace: float) -> None:
    """Run uvicorn in a thread and the engine on this one until uvicorn has exited. The first
    SIGINT/SIGTERM starts draining (see _drain); a second one exits at once. The engine keeps
    the main thread because the model was loaded on it (see Engine.run_here)."""
    def on_signal(signum, frame) -> None:
        name = signal.Signals(signum).name
        if ctx.draining:
            log.info("%s again: exiting now", name)
            server.force_exit = server.should_exit = True
            return
        ctx.draining = True
        log.info("%s: draining; %d request(s) in flight get up to %g s (again to exit now)",
                 name, ctx.in_flight, grace)
        threading.Thread(target=_drain, args=(server, ctx, grace), name="drain", daemon=True).start()

    def run_http() -> None:
        # Torch work on the HTTP side (adapter uploads and K/V loads) runs single-threaded, and
        # so do worker threads started later (they inherit torch's default, now 1): a second
        # OpenMP pool beside the engine's slows every step (see Engine.run_here).
        import torch  # noqa: PLC0415 (serve imports torch lazily)

        torch.set_num_threads(1)
        server.run()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=run_http, name="http")
    try:
        thread.start()
        # The engine's idle waits are timed, so signal handlers run here promptly.
        engine.run_here(thread.is_alive)
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
