"""Image inputs over real HTTP (issue 16, serving): OpenAI `image_url` content parts (openai SDK),
TGI markdown images (httpx), image-conditioned adapters batched with every other kind, the
feature cache, the prefix cache keyed by image, hostile images, and remote URLs.

Tiny random LLaMA + tiny random CLIP vision tower; the reference is computed here from the
model pieces (tower → features → compute_visual_adapter_kv → a plain greedy loop)."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
import torch
from adapter_helpers import adapter_bytes, random_lora
from conftest import greedy_generate
from http_harness import ADMIN_TOKEN, live_server, raw_request
from PIL import Image
from vision_helpers import save_tiny_clip_vision

from model.adapter import AdapterBatch, VisualAdapterWeights, compute_visual_adapter_kv
from model.image_preprocess import preprocess
from model.vision import VisionTower
from server.images import split_markdown_images
from server.routes_common import ServerSettings

PROMPT = "Describe the picture in a few words, please, with care and detail."
N_NEW = 6


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip_vision(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def tower(clip_dir):
    return VisionTower.from_dir(clip_dir)


def random_visual(model, tower, seed: int, feature_layers=(1, 3), k: int = 3) -> VisualAdapterWeights:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    layers = [cfg.n_layers - 2, cfg.n_layers - 1]
    f = len(feature_layers) * tower.width
    return VisualAdapterWeights(layers, torch.randn(len(layers), k, cfg.dim, generator=g),
                                torch.rand(len(layers), 1, generator=g) * 0.8 + 0.2,
                                torch.randn(cfg.dim, f, generator=g) * 0.5, torch.randn(cfg.dim, generator=g),
                                tuple(feature_layers), tower.fingerprint)


def picture(seed: int, size=(40, 30), fmt: str = "PNG") -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _upload(server, name: str, weights) -> None:
    data = adapter_bytes(server.loaded.model, weights, server.loaded.fingerprint)
    with server.admin() as c:
        r = c.put(f"/admin/adapters/{name}", files={"file": ("a.safetensors", data)})
    assert r.status_code == 201, r.text


def _serve(tiny_loaded, tower, store, **kw):
    settings = kw.pop("settings", None) or ServerSettings(admin_token=ADMIN_TOKEN)
    return live_server(tiny_loaded, store, vision=tower, settings=settings, max_batch=8, **kw)


def _stock(s, tower) -> None:
    """Two image adapters (different feature layers and prompt lengths), a text adapter, a LoRA."""
    model = s.loaded.model
    s.visual = {"vis": random_visual(model, tower, 1), "vis2": random_visual(model, tower, 2, (0, 2), k=5)}
    for name, w in s.visual.items():
        _upload(s, name, w)
    s.upload("alpha", seed=3)
    _upload(s, "lo", random_lora(model, 4, ("q", "v"), seed=4))


@pytest.fixture(scope="module")
def server(tiny_loaded, tower, tmp_path_factory):
    with _serve(tiny_loaded, tower, tmp_path_factory.mktemp("store")) as s:
        _stock(s, tower)
        yield s


def reference(server, tower, adapter: str, image: bytes, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens/logprobs from the paper's pieces, without the engine."""
    model = server.loaded.model
    w = server.visual[adapter]
    features = tower.global_features(preprocess([Image.open(io.BytesIO(image)).convert("RGB")], tower.config),
                                     w.feature_layers)[0]
    kv = compute_visual_adapter_kv(model, w, features)
    return greedy_generate(model, prompt_ids, N_NEW, AdapterBatch.build([kv], model.config.n_layers))


def tgi(server, inputs: str, adapter: str | None = None, **parameters) -> httpx.Response:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": N_NEW, "details": True, "ignore_eos_token": True,
                                              "adapter_id": adapter, **parameters}}
    return httpx.post(server.url + "/generate", json=body, timeout=60)


def tokens_and_logprobs(response: httpx.Response) -> tuple[list[int], list[float]]:
    assert response.status_code == 200, response.text
    tokens = response.json()["details"]["tokens"]
    return [t["id"] for t in tokens], [t["logprob"] for t in tokens]


# ---- requests with images ---------------------------------------------------------------------
def test_markdown_images_leave_the_text():
    assert split_markdown_images("a ![x](data:image/png;base64,AAAA) b ![](http://h/i.png)") == (
        "a  b ", ["data:image/png;base64,AAAA", "http://h/i.png"])
    assert split_markdown_images("no [link](http://x) here") == ("no [link](http://x) here", [])


def test_tgi_markdown_image_equals_the_papers_formula(server, tower):
    image = picture(0)
    got = tokens_and_logprobs(tgi(server, PROMPT + f" ![a photo]({data_url(image)})", "vis"))
    ids = server.loaded.tokenizer.encode(PROMPT + " ")
    want = reference(server, tower, "vis", image, ids)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-4)
    # Where the image sits in the text does not matter: it conditions the prompts, not the tokens.
    assert tokens_and_logprobs(tgi(server, f"![]({data_url(image)})" + PROMPT + " ", "vis")) == got
    # The image matters: another picture gives another answer.
    assert tokens_and_logprobs(tgi(server, PROMPT + f" ![]({data_url(picture(1))})", "vis"))[1] != got[1]


def test_openai_content_parts(server, tower):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    image = data_url(picture(2, fmt="JPEG"), "image/jpeg")

    def ask(content):
        out = client.chat.completions.create(model="vis", messages=[{"role": "user", "content": content}],
                                             max_tokens=N_NEW, temperature=0, logprobs=True,
                                             extra_body={"ignore_eos": True})
        return [t.logprob for t in out.choices[0].logprobs.content], out.choices[0].message.content

    text = {"type": "text", "text": PROMPT}
    part = {"type": "image_url", "image_url": {"url": image, "detail": "low"}}
    first = ask([part, text])
    assert ask([text, part]) == first
    # The chat template gets the text alone; the reference conditions the adapter on the image.
    prompt = server.loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                         add_generation_prompt=True)
    ids = server.loaded.tokenizer.encode(prompt, add_bos=False)
    jpeg = base64.b64decode(image.split(",", 1)[1])
    want_tokens, want_lps = reference(server, tower, "vis", jpeg, ids)
    assert first[0] == pytest.approx(want_lps, abs=1e-4)
    assert first[1] == server.loaded.tokenizer.decode(want_tokens)


@pytest.mark.parametrize("adapter,images,message", [
    ("alpha", 1, "not a llama-adapter-visual adapter"),
    ("lo", 1, "not a llama-adapter-visual adapter"),
    (None, 1, "the base model takes none"),
    ("vis", 0, "send exactly one image"),
    ("vis", 2, "at most 1"),
])
def test_image_and_adapter_must_match(server, adapter, images, message):
    inputs = PROMPT + "".join(f"![]({data_url(picture(i))})" for i in range(images))
    r = tgi(server, inputs, adapter)
    assert r.status_code == 422 and message in r.json()["error"], r.text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    content = [{"type": "text", "text": PROMPT}] + [{"type": "image_url", "image_url": {"url": data_url(picture(i))}}
                                                     for i in range(images)]
    with pytest.raises(openai.UnprocessableEntityError, match=message):
        client.chat.completions.create(model=adapter or server.ctx.model_id, max_tokens=2,
                                       messages=[{"role": "user", "content": content}])
    assert server.registry.stats().pinned_count == 0


def test_mixed_batch_rows_equal_their_solo_runs(tiny_loaded, tower, tmp_path):
    """Image rows (different images, adapters and feature layers), a text adapter, a LoRA and the
    base model in one step; the feature cache is off, so the step also encodes the images
    together. Each row equals its run alone (tokens exact, logprobs within 1e-4)."""
    with _serve(tiny_loaded, tower, tmp_path, start_engine=False, image_feature_cache=0,
                prefix_caching=False, max_tokens_per_step=512) as s:
        _stock(s, tower)
        a, b, c = (data_url(picture(i)) for i in range(3))
        jobs = [("vis", a), ("vis", b), ("vis2", a), ("alpha", None), ("lo", None), (None, None), ("vis2", c)]

        def send(job):
            adapter, url = job
            return tokens_and_logprobs(tgi(s, PROMPT + (f"![]({url})" if url else ""), adapter))

        solo = [s.stepping(send, job).result() for job in jobs]
        encoded = s.engine.stats().images_encoded_total
        assert encoded == 4
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(send, job) for job in jobs]
            deadline = time.monotonic() + 30
            while s.engine.stats().waiting < len(jobs):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            steps = s.engine.stats().steps_total
            while not all(f.done() for f in futures):
                s.engine.step()
            together = [f.result() for f in futures]
        stats = s.engine.stats()
        assert stats.images_encoded_total == encoded + 4
        assert stats.steps_total - steps == N_NEW        # one prefill step (all rows), then decodes
        for (tokens, lps), (solo_tokens, solo_lps) in zip(together, solo):
            assert tokens == solo_tokens
            assert lps == pytest.approx(solo_lps, abs=1e-4)
        assert len({tuple(lps) for _, lps in solo}) == len(jobs)     # every row really differs


def test_repeated_image_hits_the_feature_cache(server):
    image = PROMPT + f"![]({data_url(picture(7))})"
    before = server.engine.stats()
    first = tokens_and_logprobs(tgi(server, image, "vis"))
    assert tokens_and_logprobs(tgi(server, image, "vis")) == first
    after = server.engine.stats()
    assert after.images_encoded_total - before.images_encoded_total == 1
    assert after.image_feature_cache_misses - before.image_feature_cache_misses == 1
    assert after.image_feature_cache_hits - before.image_feature_cache_hits == 1
    assert server.metric("adapter_server_image_feature_cache_hits_total") == after.image_feature_cache_hits


def test_prefix_cache_never_serves_another_images_blocks(server, tower):
    long_prompt = PROMPT * 3          # several full KV blocks
    ids = server.loaded.tokenizer.encode(long_prompt)
    base_hits = server.engine.stats().prefix_cache_hits.get("vis", 0)
    for seed in (10, 11):
        image = picture(seed)
        got = tokens_and_logprobs(tgi(server, long_prompt + f"![]({data_url(image)})", "vis"))
        want = reference(server, tower, "vis", image, ids)
        assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-4)
    assert server.engine.stats().prefix_cache_hits.get("vis", 0) == base_hits     # image 11 got no hit
    again = tokens_and_logprobs(tgi(server, long_prompt + f"![]({data_url(picture(11))})", "vis"))
    assert server.engine.stats().prefix_cache_hits.get("vis", 0) > base_hits   # the same image does
    assert again[0] == got[0] and again[1] == pytest.approx(got[1], abs=1e-5)


def test_generate_cli_takes_an_image_file(server, tower, clip_dir, tiny_model_dir, tmp_path, capsys):
    from adapters.format import metadata_for, save_adapter
    from server.cli import main

    adapter, image = tmp_path / "vis.safetensors", tmp_path / "picture.jpg"
    w = server.visual["vis"]
    save_adapter(adapter, w, metadata_for(w, server.loaded.model, "uploaded", fingerprint=server.loaded.fingerprint))
    image.write_bytes(picture(4, fmt="JPEG"))
    args = ["generate", "--model", str(tiny_model_dir), "--weights", "fp32", "--prompt", PROMPT, "--json",
            "--max-new-tokens", str(N_NEW), "--adapter", str(adapter), "--vision-model", str(clip_dir)]
    assert main(args + ["--image", str(image)]) == 0
    out = json.loads(capsys.readouterr().out)
    want_tokens, want_lps = reference(server, tower, "vis", image.read_bytes(), out["prompt_token_ids"])
    n = len(out["token_ids"])
    assert out["token_ids"] == want_tokens[:n] and out["logprobs"] == pytest.approx(want_lps[:n], abs=1e-4)
    assert main(args) == 2 and "send exactly one image" in capsys.readouterr().err
    image.write_bytes(SVG)
    with pytest.raises(SystemExit, match="not a PNG, JPEG"):
        main(args + ["--image", str(image)])


# ---- hostile images ---------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height pixels and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


@pytest.mark.parametrize("url,status,reason", [
    (lambda: data_url(picture(0)[:200]), 422, "decode"),                         # truncated PNG
    (lambda: data_url(_png_header_only(20000, 20000)), 413, "pixels"),
    (lambda: data_url(_animated_gif(), "image/gif"), 422, "animated"),
    (lambda: data_url(picture(0), "image/jpeg"), 422, "mime_mismatch"),          # PNG bytes, JPEG label
    (lambda: data_url(SVG, "image/svg+xml"), 422, "format"),
    (lambda: data_url(SVG, "image/png"), 422, "format"),
    (lambda: "data:image/png;base64,%%%%", 422, "url"),
    (lambda: "file:///etc/passwd", 422, "url"),
    (lambda: "http://127.0.0.1:9/x.png", 422, "remote_disabled"),
])
def test_hostile_images_are_refused_and_the_server_stays_healthy(server, url, status, reason):
    before = server.metric("adapter_server_image_input_failures_total", reason=reason)
    r = tgi(server, PROMPT + f"![]({url()})", "vis")
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == ("too_large" if status == 413 else "validation")
    assert "image" in r.json()["error"]
    assert server.metric("adapter_server_image_input_failures_total", reason=reason) == before + 1
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="vis", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url()}}]}])
    assert e.value.status_code == status and e.value.body["param"] == "messages"
    assert httpx.get(server.url + "/health").status_code == 200
    assert tgi(server, PROMPT + f"![]({data_url(picture(0))})", "vis").status_code == 200
    assert server.registry.stats().pinned_count == 0


def test_images_over_the_byte_and_body_limits(tiny_loaded, tower, tmp_path):
    settings = ServerSettings(admin_token=ADMIN_TOKEN, max_body_bytes=1 << 20, max_image_bytes=100_000)
    with _serve(tiny_loaded, tower, tmp_path, settings=settings) as s:
        _upload(s, "vis", random_visual(s.loaded.model, tower, 1))
        big = picture(0, size=(300, 300))                   # ~270 kB of noise: over the image limit
        r = tgi(s, f"![]({data_url(big)})", "vis")
        assert r.status_code == 413 and "--max-image-bytes" in r.json()["error"], r.text
        # A 1 GB data URL: refused from the declared length, before the body is read.
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n")
        start = b'{"model": "vis", "messages": [{"role": "user", "content": [{"type": "image_url", ' \
                b'"image_url": {"url": "data:image/png;base64,' + b"A" * 65536
        answer, elapsed = raw_request(s, head, start)
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer and elapsed < 5, answer
        # ... and one streamed without a length, counted as it arrives.
        chunks = iter([start] + [b"A" * 65536] * 32)
        r = httpx.post(s.url + "/generate", content=chunks, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 413 and r.json()["error_type"] == "too_large"
        assert tgi(s, PROMPT + f"![]({data_url(picture(1))})", "vis").status_code == 200


def test_no_vision_model_means_no_images(tiny_loaded, tmp_path):
    with live_server(tiny_loaded, tmp_path) as s:
        r = tgi(s, PROMPT + f"![]({data_url(picture(0))})")
        assert r.status_code == 422 and "--vision-model" in r.json()["error"], r.text
        assert tgi(s, PROMPT).status_code == 200


# ---- remote images ----------------------------------------------------------------------------
class _Images(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, headers, body = self.routes[self.path]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        for piece in body if isinstance(body, list) else [body]:
            if piece is None:
                time.sleep(2.5)
                continue
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, *args):
        pass


def test_remote_images(tiny_loaded, tower, tmp_path):
    png = picture(5)
    _Images.routes = {
        "/ok.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(png))}, png),
        "/moved": (302, {"Location": "/ok.png", "Content-Length": "0"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd", "Content-Length": "0"}, b""),
        "/big.png": (200, {"Content-Type": "image/png"}, [png] * 40),          # no length, too many bytes
        "/slow.png": (200, {"Content-Type": "image/png"}, [png[:10], None, png[10:]]),
        "/label.png": (200, {"Content-Type": "image/jpeg"}, png),
        "/gone.png": (404, {"Content-Length": "0"}, b""),
    }
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    settings = ServerSettings(admin_token=ADMIN_TOKEN, allow_remote_images=True, max_image_bytes=len(png) * 10,
                              remote_image_timeout_s=1.0)
    try:
        with _serve(tiny_loaded, tower, tmp_path, settings=settings) as s:
            _upload(s, "vis", random_visual(s.loaded.model, tower, 1))
            inline = tokens_and_logprobs(tgi(s, PROMPT + f"![]({data_url(png)})", "vis"))
            assert tokens_and_logprobs(tgi(s, PROMPT + f"![]({base}/ok.png)", "vis")) == inline
            assert tokens_and_logprobs(tgi(s, PROMPT + f"![]({base}/moved)", "vis")) == inline
            for path, status, words in (("/to-file", 422, "could not be fetched"), ("/big.png", 413, "bytes"),
                                        ("/slow.png", 422, "longer than 1 s"), ("/label.png", 422, "declared"),
                                        ("/gone.png", 422, "HTTP 404")):
                r = tgi(s, PROMPT + f"![]({base}{path})", "vis")
                assert r.status_code == status and words in r.json()["error"], (path, r.text)
    finally:
        http.shutdown()
