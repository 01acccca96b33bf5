"""A queued job's image as a compact, pixels-only blob that decodes to exactly what the API saw.

The API decodes an upload once (``app.intake.decode_image``) and hands the worker the result
through Redis. Storing that RGB image re-encoded as PNG costs several times the upload; this
module stores the upload's own compressed pixels instead, with everything that could carry
patient data removed, and checks at encode time that decoding the blob gives bit-identical
pixels. Workers import this module; it never imports ``app``.

Blob layout (all integers big-endian)::

    magic     4 bytes  b"UBXI"
    version   1 byte   1
    kind      1 byte   what the payload is (see below)
    transpose 1 byte   0: none, else PIL.Image.Transpose value + 1 (the EXIF orientation the
                       API applied, read from the original bytes before stripping)
    width     4 bytes  of the decoded RGB image
    height    4 bytes
    sha256   32 bytes  of the decoded RGB pixels (``Image.tobytes()``)
    payload   the rest

Kinds:

1 ``JPEG_STRIPPED``: the upload's JPEG stream (the first frame of an MPO) rebuilt from its
  pixel segments only: tables, frame and scan headers and entropy-coded data. APP0 is replaced
  by a canonical JFIF header (the JFIF marker decides the colour transform), APP14 is cut to
  the fixed Adobe fields (they decide the colour transform, CMYK inversion included); every
  other APPn (EXIF, XMP, ICC, IPTC, MPF), COM and anything after EOI is dropped.
2 ``PNG_STRIPPED``: the upload's PNG with only IHDR, PLTE, tRNS, IDAT and IEND kept.
3 ``WEBP_STRIPPED``: the upload's still WebP with only VP8X (metadata flags cleared), ALPH,
  VP8 and VP8L kept.
4 ``WEBP_LOSSLESS`` / 5 ``PNG_LOSSLESS``: the decoded RGB image re-encoded losslessly, for
  every other upload and whenever a stripped stream does not decode bit-identically.

Decoding a blob: Pillow decodes the payload, converts it to RGB as the API does (alpha over
white), applies the transpose, and checks size and digest, so a worker whose Pillow decodes
differently from the API's fails loudly instead of explaining different pixels.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from collections.abc import Callable
from enum import IntEnum

import numpy as np
from PIL import ExifTags, Image

MAGIC = b"UBXI"
VERSION = 1
_HEADER = struct.Struct(">4sBBBII32s")
HEADER_SIZE = _HEADER.size


class Kind(IntEnum):
    """What a blob's payload is."""

    JPEG_STRIPPED = 1
    PNG_STRIPPED = 2
    WEBP_STRIPPED = 3
    WEBP_LOSSLESS = 4
    PNG_LOSSLESS = 5


_PILLOW_FORMAT = {
    Kind.JPEG_STRIPPED: "JPEG",
    Kind.PNG_STRIPPED: "PNG",
    Kind.WEBP_STRIPPED: "WEBP",
    Kind.WEBP_LOSSLESS: "WEBP",
    Kind.PNG_LOSSLESS: "PNG",
}


class StoredImageError(ValueError):
    """A stored image blob that is corrupt, truncated or decodes to other pixels."""


class _Unusable(Exception):
    """A candidate encoding that cannot represent this upload; the encoder tries the next."""


# --- public API -------------------------------------------------------------------------


def encode_for_storage(data: bytes, decoded: Image.Image, source_format: str) -> bytes:
    """The blob to queue for ``decoded`` (the API's RGB decode of upload ``data``).

    Tries the upload's own stream stripped of metadata, then lossless re-encodes; returns the
    first candidate whose decode is bit-identical to ``decoded``.
    """
    if decoded.mode != "RGB":
        raise ValueError(f"decoded must be an RGB image, not {decoded.mode}")
    target = np.asarray(decoded)
    digest = hashlib.sha256(target).digest()  # np.asarray of an image is C-contiguous
    stripped = _stripped_candidate(data, source_format)
    if stripped is not None:
        blob = _verified_stripped(*stripped, data, target, digest)
        if blob is not None:
            return blob
    for kind in (Kind.WEBP_LOSSLESS, Kind.PNG_LOSSLESS):
        blob = _verified_lossless(kind, target, digest)
        if blob is not None:
            return blob
    raise StoredImageError("no lossless encoding reproduced the decoded pixels")


def decode_stored(blob: bytes) -> Image.Image:
    """The RGB image a blob holds: bit-identical to the image the API decoded."""
    kind, op, size, digest, payload = _parse(blob)
    try:
        raw = _open_rgb(payload, kind, _size_before(size, op))
    except _Unusable as error:
        raise StoredImageError(f"stored image payload is unusable: {error}") from None
    image = _transpose(raw, op)
    if image.size != size:
        raise StoredImageError(f"stored image decodes to {image.size}, header says {size}")
    if hashlib.sha256(image.tobytes()).digest() != digest:
        raise StoredImageError("stored image pixels do not match their digest (a corrupt blob, or "
                               "this process's Pillow decodes differently from the API's)")
    return image


def stored_kind(blob: bytes) -> Kind:
    """Which encoding a blob uses (for metrics and tests)."""
    return _parse(blob)[0]


# --- header -------------------------------------------------------------------------------


def _pack(kind: Kind, op: Image.Transpose | None, size: tuple[int, int], digest: bytes,
          payload: bytes) -> bytes:
    op_byte = 0 if op is None else int(op) + 1
    return _HEADER.pack(MAGIC, VERSION, int(kind), op_byte, size[0], size[1], digest) + payload


def _parse(blob: bytes) -> tuple[Kind, Image.Transpose | None, tuple[int, int], bytes, bytes]:
    """Header fields and payload; StoredImageError on anything malformed."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) <= _HEADER.size:
        raise StoredImageError("stored image blob is missing or truncated")
    magic, version, kind_code, op_byte, width, height, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StoredImageError("not a stored image blob (bad magic)")
    if version != VERSION:
        raise StoredImageError(f"stored image blob version {version} is not supported")
    try:
        kind = Kind(kind_code)
    except ValueError:
        raise StoredImageError(f"unknown stored image kind {kind_code}") from None
    if op_byte > len(Image.Transpose):
        raise StoredImageError(f"unknown transpose {op_byte}")
    if width < 1 or height < 1:
        raise StoredImageError("stored image has no pixels")
    op = None if op_byte == 0 else Image.Transpose(op_byte - 1)
    return kind, op, (width, height), digest, bytes(blob[_HEADER.size:])


# --- decoding shared by encoder (verification) and worker ----------------------------------

_SWAPS_AXES = {Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270,
               Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE}


def _size_before(size: tuple[int, int], op: Image.Transpose | None) -> tuple[int, int]:
    """The payload's own size for a decoded ``size`` (axis-swapping ops swap it back)."""
    return (size[1], size[0]) if op in _SWAPS_AXES else size


def _transpose(image: Image.Image, op: Image.Transpose | None) -> Image.Image:
    return image if op is None else image.transpose(op)


def _open_rgb(payload: bytes, kind: Kind, expected_size: tuple[int, int] | None) -> Image.Image:
    """Decode a payload and convert it to RGB as the API does; _Unusable on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(payload), formats=(_PILLOW_FORMAT[kind],))
            if expected_size is not None and image.size != expected_size:
                raise _Unusable(f"payload is {image.size}, expected {expected_size}")
            image.load()
            rgb = _as_rgb(image)
            rgb.load()
    except _Unusable:
        raise
    except Exception as error:  # Pillow raises many types for bad streams
        raise _Unusable(f"{type(error).__name__}: {error}") from None
    return rgb


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("1", "L", "P", "CMYK", "YCbCr")


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB as the API's intake makes it (alpha over white); other modes are not stored raw."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    raise _Unusable(f"mode {mode} is re-encoded, not stored raw")


# --- candidates ------------------------------------------------------------------------------


def _stripped_candidate(data: bytes, source_format: str) -> tuple[Kind, bytes] | None:
    """The upload's own stream without metadata, or None where the format has no stripper."""
    strippers: dict[str, tuple[Kind, Callable[[bytes], bytes]]] = {
        "JPEG": (Kind.JPEG_STRIPPED, _strip_jpeg),
        "MPO": (Kind.JPEG_STRIPPED, _strip_jpeg),
        "PNG": (Kind.PNG_STRIPPED, _strip_png),
        "WEBP": (Kind.WEBP_STRIPPED, _strip_webp),
    }
    if source_format.upper() not in strippers:
        return None
    kind, strip = strippers[source_format.upper()]
    try:
        return kind, strip(data)
    except (_Unusable, IndexError, struct.error):
        return None


def _verified_stripped(kind: Kind, payload: bytes, original: bytes, target: np.ndarray,
                       digest: bytes) -> bytes | None:
    """The blob for a stripped payload if some transpose of its decode equals ``target``."""
    try:
        raw = _open_rgb(payload, kind, None)
    except _Unusable:
        return None
    size = (target.shape[1], target.shape[0])
    for op in _ops_to_try(_orientation_hint(original), raw.size, size):
        if np.array_equal(np.asarray(_transpose(raw, op)), target):
            return _pack(kind, op, size, digest, payload)
    return None


def _verified_lossless(kind: Kind, target: np.ndarray, digest: bytes) -> bytes | None:
    """The blob for a lossless re-encode of ``target`` if it decodes back to it."""
    clean = Image.fromarray(target)  # a fresh image: no info dict (ICC, EXIF) to carry along
    buffer = io.BytesIO()
    try:
        if kind is Kind.WEBP_LOSSLESS:
            clean.save(buffer, format="WEBP", lossless=True, method=0, quality=0)
        else:
            clean.save(buffer, format="PNG", compress_level=1)
        raw = _open_rgb(buffer.getvalue(), kind, clean.size)
    except (_Unusable, OSError, ValueError):
        return None
    if not np.array_equal(np.asarray(raw), target):
        return None
    return _pack(kind, None, clean.size, digest, buffer.getvalue())


_ORIENTATION_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation_hint(data: bytes) -> int:
    """The EXIF orientation of the original as Pillow sees it when opening (EXIF or XMP).

    The base ``Image.getexif`` reads what opening found without decoding pixels; metadata
    that only a full decode reaches (a PNG eXIf after IDAT) is covered by trying every op.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1


def _ops_to_try(hint: int, raw_size: tuple[int, int],
                size: tuple[int, int]) -> list[Image.Transpose | None]:
    """Transposes that map ``raw_size`` to ``size``: the hinted one first, then none, then all."""
    ordered: list[Image.Transpose | None] = [_ORIENTATION_OPS.get(hint), None, *Image.Transpose]
    ops: list[Image.Transpose | None] = []
    for op in ordered:
        if op not in ops and _size_before(size, op) == raw_size:
            ops.append(op)
    return ops


# --- JPEG ------------------------------------------------------------------------------------

#: The end of an entropy-coded segment: a marker that is not a stuffed 0xFF00, RSTn or fill.
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PIXEL_SEGMENTS = _SOF | {0xC4, 0xCC, 0xDB, 0xDC, 0xDD}  # SOFn, DHT, DAC, DQT, DNL, DRI
_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_ADOBE_LENGTH = 12  # "Adobe", version, flags0, flags1, transform


def _strip_jpeg(data: bytes) -> bytes:
    """The first JPEG stream in ``data`` rebuilt from the segments that define its pixels."""
    if not data.startswith(b"\xff\xd8"):
        raise _Unusable("not a JPEG stream")
    out = [b"\xff\xd8"]
    pos = 2
    while True:
        marker, pos = _next_marker(data, pos)
        if marker == 0xD9:
            out.append(b"\xff\xd9")
            return b"".join(out)
        length = int.from_bytes(data[pos:pos + 2], "big")
        end = pos + length
        if length < 2 or end > len(data):
            raise _Unusable("truncated JPEG segment")
        if marker == 0xDA:
            scan_end = _ENTROPY_END.search(data, end)
            if scan_end is None:
                raise _Unusable("JPEG scan without an end")
            out.append(b"\xff\xda" + data[pos:scan_end.start()])
            pos = scan_end.start()
            continue
        kept = _kept_jpeg_segment(marker, data[pos + 2:end])
        if kept is not None:
            out.append(kept)
        pos = end


def _next_marker(data: bytes, pos: int) -> tuple[int, int]:
    """The marker code at ``pos`` (fill bytes skipped) and the position after it."""
    if pos >= len(data) or data[pos] != 0xFF:
        raise _Unusable("expected a JPEG marker")
    while pos < len(data) and data[pos] == 0xFF:
        pos += 1
    if pos >= len(data):
        raise _Unusable("truncated JPEG marker")
    return data[pos], pos + 1


def _kept_jpeg_segment(marker: int, body: bytes) -> bytes | None:
    """The segment to keep for ``marker`` (rewritten to fixed fields), or None to drop it."""
    if marker in _JPEG_PIXEL_SEGMENTS:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body
    if marker == 0xE0:
        return _JFIF if body.startswith(b"JFIF\x00") else None
    if marker == 0xEE:
        if not body.startswith(b"Adobe") or len(body) < _ADOBE_LENGTH:
            return None
        return b"\xff\xee" + struct.pack(">H", _ADOBE_LENGTH + 2) + body[:_ADOBE_LENGTH]
    if 0xE1 <= marker <= 0xEF or marker == 0xFE:
        return None
    raise _Unusable(f"unexpected JPEG marker 0x{marker:02X}")


# --- PNG -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"}


def _strip_png(data: bytes) -> bytes:
    """The PNG with only the chunks that define its pixels (no text, eXIf, ICC, time, APNG)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise _Unusable("not a PNG")
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunk_type = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise _Unusable("truncated PNG chunk")
        if chunk_type in _PNG_PIXEL_CHUNKS:
            out.append(data[pos:end])
        if chunk_type == b"IEND":
            return b"".join(out)
        pos = end
    raise _Unusable("PNG without IEND")


# --- WebP ------------------------------------------------------------------------------------

_WEBP_PIXEL_CHUNKS = {b"VP8 ", b"VP8L", b"ALPH"}
_VP8X_KEPT_FLAGS = 0x10  # alpha; ICC (0x20), EXIF (0x08), XMP (0x04) go with their chunks


def _strip_webp(data: bytes) -> bytes:
    """A still WebP with only its pixel chunks; animations are re-encoded instead."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise _Unusable("not a WebP")
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    chunks = []
    pos = 12
    while pos + 8 <= end:
        fourcc = data[pos:pos + 4]
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        chunk = data[pos:pos + 8 + length + (length & 1)]
        if len(chunk) < 8 + length:
            raise _Unusable("truncated WebP chunk")
        if fourcc in (b"ANIM", b"ANMF"):
            raise _Unusable("animated WebP")
        if fourcc == b"VP8X" and length == 10:
            chunks.append(b"VP8X" + struct.pack("<I", 10) + bytes([chunk[8] & _VP8X_KEPT_FLAGS])
                          + b"\x00\x00\x00" + chunk[12:18])
        elif fourcc in _WEBP_PIXEL_CHUNKS:
            chunks.append(chunk)
        pos += len(chunk)
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
