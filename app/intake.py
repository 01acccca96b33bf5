"""Image intake: decode an upload into a clean RGB image, or refuse it with a precise reason.

Refusals are :class:`ImageRejected` with an HTTP status: 400 empty/corrupt/truncated data,
413 too many pixels (checked from the header, before pixels are decoded), 415 not an image or
a format we do not take. Nothing in here raises anything else for any input bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import UnboxError

ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageRejected(UnboxError, ValueError):
    """An upload that cannot be used; ``status`` and ``code`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, orientation applied
    format: str
    original_mode: str


def _looks_like_supported_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: alpha over white, 16-bit and float scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 255.0 / max(top, 1e-12)
        elif mode.startswith("I;16") or 255 < top <= 65535:
            scale = 255.0 / 65535.0
        elif top <= 255:
            scale = 1.0
        else:
            scale = 255.0 / top
        gray = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode ``data`` (first frame of animations and multi-page files) into RGB."""
    if not data:
        raise ImageRejected(400, "empty_upload", "the uploaded file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(413, "too_many_pixels", "the image declares more pixels than allowed") from None
        except UnidentifiedImageError:
            if _looks_like_supported_image(data):
                raise ImageRejected(400, "corrupt_image", "the image data is corrupt or truncated") from None
            raise ImageRejected(415, "unsupported_format",
                                f"not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})") from None
        except Exception:  # Pillow raises many types for hostile headers
            raise ImageRejected(400, "corrupt_image", "the image header is corrupt") from None
        if image.format not in ACCEPTED_FORMATS:
            raise ImageRejected(415, "unsupported_format",
                                f"{image.format} images are not accepted; use {', '.join(ACCEPTED_FORMATS)}")
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected(400, "corrupt_image", "the image has no pixels")
        if width * height > max_pixels:
            raise ImageRejected(413, "too_many_pixels",
                                f"the image has {width} x {height} pixels; at most {max_pixels} are allowed")
        original_mode, image_format = image.mode, image.format
        try:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(image)
            rgb.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(413, "too_many_pixels", "the image decodes to more pixels than allowed") from None
        except MemoryError:
            raise ImageRejected(413, "too_many_pixels", "the image is too large to decode") from None
        except Exception:
            raise ImageRejected(400, "corrupt_image", "the image data is corrupt or truncated") from None
    return DecodedImage(image=rgb, format=image_format, original_mode=original_mode)
