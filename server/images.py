"""Image inputs of generation requests: URLs in, decoded `ImageInput`s out (no tensors here).

Where images come from:
  * `data:image/<type>;base64,<bytes>` URLs (OpenAI `image_url` content parts, TGI markdown);
  * `http(s)://` URLs, fetched only when the server runs with `--allow-remote-images`
    (size cap, total timeout, at most 3 redirects and only to http(s)).

Every image is checked before Pillow decodes a pixel: the byte size (`--max-image-bytes`), the
format sniffed from the bytes themselves (PNG, JPEG, WebP, GIF; SVG and everything else are
refused) against the declared MIME type, and the pixel count read from the header
(`--max-image-pixels`, so a small file declaring 20000×20000 pixels, a decompression bomb, is
refused unread). Animated images are refused: the visual adapter conditions on one picture.
A request carries at most MAX_IMAGES_PER_REQUEST images.

Callers run this in a worker thread (decoding and fetching take milliseconds to seconds). Every
refusal is an `ApiError` naming the problem: 413 for sizes over a limit, 422 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import time
import warnings

import httpx
from PIL import Image

from server.metrics import IMAGE_FAILURE_REASONS
from server.routes_common import ApiError, ServerContext
from server.types import ImageInput

# The visual adapter adds one global image feature to its prompts (the paper's design): one image.
MAX_IMAGES_PER_REQUEST = 1
MAX_REDIRECTS = 3
# Pillow format name → the one MIME type a client may declare for it.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_MIME_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}
_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
# TGI / LoRAX put images in `inputs` as markdown: ![alt text](url)
# Linear time on hostile text: the alt text holds no bracket or newline (a scan from one "![" stops
# before the next), and (?=(x))\1 matches x atomically (no backtracking into it on a failed match).
_MARKDOWN_IMAGE = re.compile(r"!\[(?=([^\[\]\n]*))\1\]\(\s*(?=([^()\s]+))\2\s*\)")


def split_markdown_images(text: str) -> tuple[str, list[str]]:
    """'Describe ![](data:...) please' → ('Describe  please', ['data:...'])."""
    urls = [m.group(2) for m in _MARKDOWN_IMAGE.finditer(text)]
    return (_MARKDOWN_IMAGE.sub("", text), urls) if urls else (text, [])


def request_images(ctx: ServerContext, urls: list[str], field: str) -> tuple[ImageInput, ...]:
    """The images of one request, in order. `field` names the request field they came from
    (errors name it). Refusals are counted in the metrics by reason."""
    if not urls:
        return ()
    try:
        if len(urls) > MAX_IMAGES_PER_REQUEST:
            raise ImageError(422, "count", f"{len(urls)} images in one request: at most "
                             f"{MAX_IMAGES_PER_REQUEST} (a visual adapter conditions on one image)", field)
        if getattr(ctx.engine, "vision", None) is None:
            raise ImageError(422, "no_vision_model", "this server takes no images: it was started without "
                             "--vision-model", field)
        return tuple(load_image(ctx, url, field) for url in urls)
    except ImageError as e:
        ctx.metrics.image_failures.labels(e.reason).inc()
        raise


def load_image(ctx: ServerContext, url: str, field: str) -> ImageInput:
    s = ctx.settings
    if url[:5].lower() == "data:":
        data, mime = _data_url(url, s.max_image_bytes, field)
    elif url[:7].lower() == "http://" or url[:8].lower() == "https://":
        if not s.allow_remote_images:
            raise ImageError(422, "remote_disabled", "remote image URLs are off on this server (--allow-remote-images); "
                             "send the image inline as a data:image/...;base64 URL", field)
        data, mime = _fetch(url, s.max_image_bytes, s.remote_image_timeout_s, field)
    else:
        raise ImageError(422, "url", f"image URL must be a data:image/...;base64 URL or http(s), got "
                         f"{url[:40]!r}", field)
    return decode_image(data, mime, s.max_image_pixels, field)


def decode_image(data: bytes, mime: str | None, max_pixels: int, field: str) -> ImageInput:
    """Bytes → RGB image, refusing what is not an allowed format, disagrees with its declared
    MIME type (None: nothing declared, e.g. a local file), has too many pixels (checked from the
    header, before decoding) or is animated."""
    fmt = _sniff(data)
    if fmt is None:
        raise ImageError(422, "format", "not a PNG, JPEG, WebP or GIF image (SVG and other formats are not "
                         "accepted)", field)
    mime = _MIME_ALIASES.get(mime, mime)
    if mime is not None and mime != FORMATS[fmt]:
        raise ImageError(422, "mime_mismatch", f"the image is declared {mime or 'without a type'} but its bytes "
                         f"are {fmt}", field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])      # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(413, "pixels", f"the image is {width}×{height} = {width * height} pixels: more "
                                 f"than this server's limit of {max_pixels} (--max-image-pixels)", field)
            if getattr(image, "is_animated", False):
                raise ImageError(422, "animated", f"animated {fmt} images are not accepted: send one frame", field)
            image.load()
            rgb = image.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(413, "pixels", f"the image has too many pixels: {e}", field) from None
    except Exception as e:      # noqa: BLE001 — Pillow raises many kinds (OSError, SyntaxError, ValueError...)
        raise ImageError(422, "decode", f"the {fmt} image could not be decoded: {e}", field) from None
    return ImageInput(rgb, hashlib.sha256(data).hexdigest())


def _sniff(data: bytes) -> str | None:
    """The format the bytes actually are (magic numbers), whatever the client declared."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _data_url(url: str, max_bytes: int, field: str) -> tuple[bytes, str]:
    m = _DATA_URL.match(url)
    if m is None or ";base64" not in m.group(2).lower():
        raise ImageError(422, "url", "an image data URL must look like data:image/png;base64,<data>", field)
    payload = url[m.end():]
    if len(payload) // 4 * 3 > max_bytes + 2:       # before decoding: base64 is 4 chars per 3 bytes
        raise _too_many_bytes(len(payload) // 4 * 3, max_bytes, field)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(422, "url", f"the image data URL is not valid base64: {e}", field) from None
    if len(data) > max_bytes:
        raise _too_many_bytes(len(data), max_bytes, field)
    return data, m.group(1).strip().lower()


def _fetch(url: str, max_bytes: int, timeout_s: float, field: str) -> tuple[bytes, str]:
    """GET a remote image with a size cap and a deadline on the whole transfer (httpx's own
    timeouts bound each read, not a server trickling bytes forever)."""
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=MAX_REDIRECTS) as client:
            with client.stream("GET", url, headers={"Accept": ", ".join(FORMATS.values())}) as r:
                if r.status_code != 200:
                    raise ImageError(422, "fetch", f"fetching the image returned HTTP {r.status_code}", field)
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise _too_many_bytes(int(declared), max_bytes, field)
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_many_bytes(size, max_bytes, field)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("deadline")
                    chunks.append(chunk)
                return b"".join(chunks), r.headers.get("content-type", "").split(";")[0].strip().lower()
    except httpx.TimeoutException:
        raise ImageError(422, "fetch", f"fetching the image took longer than {timeout_s:g} s", field) from None
    except httpx.HTTPError as e:    # connection refused, a redirect to another scheme, too many redirects...
        raise ImageError(422, "fetch", f"the image could not be fetched: {type(e).__name__}: {e}", field) from None


def _too_many_bytes(size: int, limit: int, field: str) -> ImageError:
    return ImageError(413, "bytes", f"the image is {size} bytes: more than this server's limit of {limit} "
                      "(--max-image-bytes)", field)


class ImageError(ApiError):
    """A refused image; `reason` is its metrics label (bytes, pixels, format, decode, ...)."""

    def __init__(self, status: int, reason: str, message: str, field: str):
        super().__init__(status, f"{field}: image: {message}", "too_large" if status == 413 else "validation",
                         field)
        assert reason in IMAGE_FAILURE_REASONS, reason
        self.reason = reason
