"""Image intake: decode an upload into a clean RGB image, or refuse it with a precise reason.

Refusals are :class:`ImageRejected` with an HTTP status: 400 empty/corrupt/truncated data,
413 too many pixels (checked from the header, before pixels are decoded), 415 not an image or
a format we do not take (or a DICOM transfer syntax no decoder here reads), 422 a ``window`` or
``frame`` the image cannot take. Nothing in here raises anything else for any input bytes.

DICOM files (by content) go through :mod:`app.dicom_intake`. High-bit-depth greyscale (16-bit
PNG or TIFF, 32-bit integer or float TIFF) is windowed onto 8 bits by :mod:`app.windowing`: the
request's window, else the range a PNG's ``sBIT`` chunk says the values use, else the data's own
range, so a 12-bit radiograph in a 16-bit PNG is as bright as it should be. The windowing
applied travels with the image (``DecodedImage.windowing``), and responses report it.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.dicom_intake import DicomRejected, decode_dicom, is_dicom
from app.windowing import NO_WINDOW, WindowRequest, Windowing, apply_window, chosen_window
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
    image: Image.Image  # RGB, orientation applied, windowed
    format: str
    original_mode: str
    windowing: Windowing | None = None  # how greyscale values beyond 8 bits (or a requested window) became 8 bits
    dicom: dict[str, Any] | None = None  # a DICOM file's technical facts (app.dicom_intake.TECHNICAL_FIELDS)

    def intake_json(self) -> dict[str, Any]:
        """What responses report about the upload: its format, the windowing, a DICOM's technical facts."""
        return {"format": self.format, "mode": self.original_mode,
                "windowing": self.windowing.as_json() if self.windowing else None, "dicom": self.dicom}


def _looks_like_supported_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def png_significant_bits(data: bytes) -> int | None:
    """The greyscale significant bits of a PNG's ``sBIT`` chunk (before its image data), if any."""
    position = 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"sBIT" and length >= 1:
            bits = data[position + 8]
            return bits if 1 <= bits <= 16 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        position += 12 + length
    return None


def _windowed(image: Image.Image, request: WindowRequest, stored_bits: int | None) -> tuple[Image.Image, Windowing]:
    values = np.asarray(image, dtype=np.float64)
    window = chosen_window(values, request, stored_bits=stored_bits if image.mode != "F" else None)
    return Image.fromarray(apply_window(values, window)).convert("RGB"), window


def _to_rgb(image: Image.Image, request: WindowRequest = NO_WINDOW,
            stored_bits: int | None = None) -> tuple[Image.Image, Windowing | None]:
    """Any Pillow mode as 8-bit RGB: alpha over white; greyscale beyond 8 bits (or with a window
    asked for) windowed; colour with a window asked for refused."""
    mode = image.mode
    if mode in HIGH_DEPTH_MODES or (request.given and mode == "L"):
        return _windowed(image, request, stored_bits if mode != "L" else None)
    if request.given:
        raise ImageRejected(422, "invalid_parameter", f"window applies to greyscale images; this one is {mode}")
    if mode == "RGB":
        return image, None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), None
    return image.convert("RGB"), None


def _decode_dicom(data: bytes, max_pixels: int, request: WindowRequest, frame: int | None) -> DecodedImage:
    try:
        dicom = decode_dicom(data, max_pixels, request, frame)
    except DicomRejected as exc:
        raise ImageRejected(exc.status, exc.code, exc.message) from None
    except MemoryError:
        raise ImageRejected(413, "too_many_pixels", "the DICOM image is too large to decode") from None
    except Exception:  # a hostile file pydicom fails on in its own way; nothing of it is echoed
        raise ImageRejected(400, "corrupt_image", "the DICOM file is corrupt or truncated") from None
    mode = f"DICOM {dicom.facts.get('photometric_interpretation') or ''}".strip()
    return DecodedImage(dicom.image, "DICOM", mode, dicom.windowing, dicom.facts)


def decode_image(data: bytes, max_pixels: int, window: WindowRequest = NO_WINDOW,
                 frame: int | None = None) -> DecodedImage:
    """Decode ``data`` (first frame of animations and multi-page files; ``frame`` of a multi-frame
    DICOM) into 8-bit RGB, windowed by ``window`` where it applies."""
    if not data:
        raise ImageRejected(400, "empty_upload", "the uploaded file is empty")
    if is_dicom(data):
        return _decode_dicom(data, max_pixels, window, frame)
    if frame not in (None, 0):
        raise ImageRejected(422, "invalid_parameter", "frame applies to multi-frame DICOM files only")
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
            stored_bits = png_significant_bits(data) if image_format == "PNG" else None
            rgb, windowing = _to_rgb(image, window, stored_bits)
            rgb.load()
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(413, "too_many_pixels", "the image decodes to more pixels than allowed") from None
        except MemoryError:
            raise ImageRejected(413, "too_many_pixels", "the image is too large to decode") from None
        except Exception:
            raise ImageRejected(400, "corrupt_image", "the image data is corrupt or truncated") from None
    return DecodedImage(image=rgb, format=image_format, original_mode=original_mode, windowing=windowing)
