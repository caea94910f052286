"""Images in: bytes (a file, a ``data:`` URL) -> a checked PIL image -> the encoder's (3, S, S) tensor.

Only PNG and JPEG are read, at most ``MAX_IMAGE_BYTES`` and ``MAX_PIXELS``; anything else is an
``ImageError`` naming the problem. Remote URLs are refused: nothing is fetched at run time.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,")


class ImageError(ValueError):
    """An image that cannot be read: not an image, a format other than PNG/JPEG, too large, a remote URL."""


def decode_image(data: bytes, where: str = "image") -> Image.Image:
    """PNG or JPEG bytes -> an RGB image, or an ``ImageError`` naming what is wrong."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{where}: {len(data):,} bytes; images are limited to {MAX_IMAGE_BYTES:,} bytes")
    if not data:
        raise ImageError(f"{where}: empty; expected a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{where}: {img.width}x{img.height} pixels; the limit is {MAX_PIXELS:,} pixels")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"{where}: too many pixels (a decompression bomb?)") from None
    except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"{where}: not a PNG or JPEG image ({type(e).__name__}: {e})"[:300]) from None
    return img.convert("RGB")


def read_image_file(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    if p.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"{p}: {p.stat().st_size:,} bytes; images are limited to {MAX_IMAGE_BYTES:,} bytes")
    return decode_image(p.read_bytes(), str(p))


def decode_data_url(url: str, where: str = "image_url") -> Image.Image:
    """``data:image/png;base64,...`` -> an image. An http(s) URL is refused: the server fetches nothing."""
    head = url[:64].lower()
    if head.startswith(("http://", "https://", "ftp://", "file:")):
        raise ImageError(
            f"{where}: remote image URLs are not fetched; send the image inline as a data: URL "
            "(data:image/png;base64,...)"
        )
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError(f"{where}: expected a data: URL (data:image/png;base64,...), got {url[:40]!r}")
    mime = (match.group("mime") or "").lower()
    if mime and mime not in FORMATS.values():
        raise ImageError(f"{where}: {mime} is not supported; send image/png or image/jpeg")
    if not match.group("b64"):
        raise ImageError(f"{where}: the data: URL must be base64-encoded (;base64,)")
    payload = url[match.end() :]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"{where}: the image is over {MAX_IMAGE_BYTES:,} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data: URL's payload is not valid base64") from None
    return decode_image(data, where)


def to_data_url(img: Image.Image) -> str:
    """An image as a PNG data: URL (what clients send)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """An image -> (3, size, size) float32 in [-1, 1] (resized, aspect ratio not kept: our images are square)."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def blank_like(images_BCHW: torch.Tensor) -> torch.Tensor:
    """A uniform mid-grey image per row: the no-image baseline's input (same prompt, nothing to see)."""
    return torch.zeros_like(images_BCHW)
