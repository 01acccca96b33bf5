"""DICOM intake: a file's pixels, windowed as a viewer shows them, and nothing of its header.

Recognised by content (``DICM`` at byte 128), read with pydicom, one frame decoded (``frame``,
default the first). Compressed transfer syntaxes decode where a decoder is installed (RLE
natively; JPEG, JPEG-LS and JPEG 2000 through the pylibjpeg plug-ins); any other is a 415
``unsupported_transfer_syntax`` naming it. Pixel limits apply before any pixel is decoded.

Greyscale (MONOCHROME1 / 2): the Modality LUT (Rescale Slope / Intercept, or its LUT) gives the
data's units (Hounsfield units for CT), then the window (:mod:`app.windowing`): the request's,
else the file's VOI LUT, else its first Window Center / Width, else the data's own range (as a
viewer's automatic window). MONOCHROME1 is inverted after windowing. Colour (RGB, YBR, palette) is converted to RGB.

Nothing of the header leaves this module but :data:`TECHNICAL_FIELDS` (rows, columns, frames,
modality, bits stored, photometric interpretation, transfer syntax). Patient and study data are
never read into a result, never logged, and pydicom's own validation warnings (which quote
element values) are silenced while a file is read.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from app.windowing import WindowRequest, Windowing, apply_window, chosen_window

logger = logging.getLogger("unbox.intake")

DICOM_MAGIC = b"DICM"
TECHNICAL_FIELDS = ("rows", "columns", "frames", "frame", "modality", "bits_stored", "photometric_interpretation",
                    "transfer_syntax")
_MODALITIES = {"CR", "CT", "DX", "MG", "MR", "NM", "OT", "PT", "RF", "SC", "US", "XA", "IO", "PX", "OP", "XC", "ES",
               "GM", "SM", "RG", "DG", "BI", "TG", "OPT", "IVOCT", "IVUS", "OCT", "BDUS"}


class DicomRejected(Exception):
    """A DICOM upload that cannot be used: ``status``, ``code``, ``message`` (no header value in it)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class DicomImage:
    image: Image.Image  # 8-bit RGB, windowed
    windowing: Windowing | None  # None for colour images
    facts: dict[str, Any]  # TECHNICAL_FIELDS only


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == DICOM_MAGIC


def _read(data: bytes) -> Any:
    import pydicom
    from pydicom import config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's validation warnings quote element values
        previous = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE
        try:
            return pydicom.dcmread(io.BytesIO(data), force=False)
        except Exception:
            raise DicomRejected(400, "corrupt_image", "the DICOM file is corrupt or truncated") from None
        finally:
            config.settings.reading_validation_mode = previous


def _int(dataset: Any, keyword: str, default: int) -> int:
    try:
        value = dataset.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def technical_facts(dataset: Any, frame: int) -> dict[str, Any]:
    """The whitelisted facts of a file, each checked to be technical (no free text passes)."""
    uid = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").strip().upper()
    return {
        "rows": _int(dataset, "Rows", 0), "columns": _int(dataset, "Columns", 0),
        "frames": _int(dataset, "NumberOfFrames", 1), "frame": frame,
        "modality": modality if modality in _MODALITIES else None,
        "bits_stored": _int(dataset, "BitsStored", 0) or None,
        "photometric_interpretation": photometric if photometric.replace("_", "").isalnum() else None,
        "transfer_syntax": _syntax_name(uid),
    }


def _syntax_name(uid: Any) -> str | None:
    if uid is None:
        return None
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def _check_decodable(dataset: Any) -> None:
    from pydicom.pixels import get_decoder

    uid = dataset.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise DicomRejected(415, "unsupported_transfer_syntax", f"the DICOM transfer syntax {_syntax_name(uid)} "
                            "cannot be decoded here; send it uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000")


def _file_window(dataset: Any) -> tuple[float, float] | None:
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        first_center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        first_width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (first_center, first_width) if first_width >= 1 else None


def _greyscale(dataset: Any, values: np.ndarray, request: WindowRequest, inverted: bool) -> tuple[np.ndarray, Windowing]:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    units = apply_modality_lut(values, dataset).astype(np.float64)
    if not request.given and "VOILUTSequence" in dataset:
        lut_out = apply_voi_lut(np.round(units).astype(np.int64), dataset, index=0, prefer_lut=True)  # LUT: integers
        descriptor = dataset.VOILUTSequence[0].get("LUTDescriptor", [0, 0, 16])
        bits = int(descriptor[2]) if len(descriptor) > 2 and 8 <= int(descriptor[2]) <= 16 else 16
        levels = np.clip(lut_out.astype(np.float64) * 255.0 / (2 ** bits - 1) + 0.5, 0, 255).astype(np.uint8)
        window = Windowing("file_voi_lut", float(2 ** bits) / 2, float(2 ** bits), "LUT", inverted)
        return (255 - levels if inverted else levels), window
    # No window in the file: the data's own range, as viewers auto-window (Bits Stored often
    # overstates it: a 12-bit NM image may use 0..16)
    window = chosen_window(units, request, file_window=None if request.given else _file_window(dataset))
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    window = Windowing(window.source, window.center, window.width,
                       "SIGMOID" if function == "SIGMOID" and window.source == "file_window" else "LINEAR", inverted)
    return apply_window(units, window), window


def _palette(dataset: Any, values: np.ndarray) -> np.ndarray:
    """PALETTE COLOR indices through the file's colour LUT, as 8-bit RGB."""
    from pydicom.pixels import apply_color_lut

    colours = apply_color_lut(values, dataset)
    scale = 255.0 / 65535.0 if colours.dtype.itemsize > 1 else 1.0
    return np.clip(colours.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)


def _colour(dataset: Any, values: np.ndarray) -> np.ndarray:
    """RGB (YBR already converted by pydicom) as 8-bit, scaled by the stored bits."""
    if values.dtype == np.uint8:
        return values
    bits = _int(dataset, "BitsStored", 8)
    if bits > 8:
        values = values.astype(np.float64) * 255.0 / (2 ** bits - 1)
    return np.clip(values + (0.5 if values.dtype.kind == "f" else 0), 0, 255).astype(np.uint8)


def decode_dicom(data: bytes, max_pixels: int, request: WindowRequest, frame: int | None = None) -> DicomImage:
    """One frame of a DICOM file as a windowed 8-bit RGB image, with the whitelisted facts."""
    from pydicom.pixels import pixel_array

    dataset = _read(data)
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise DicomRejected(415, "unsupported_format", "the DICOM file holds no image (no Pixel Data)")
    rows, columns = _int(dataset, "Rows", 0), _int(dataset, "Columns", 0)
    frames = _int(dataset, "NumberOfFrames", 1)
    if rows < 1 or columns < 1:
        raise DicomRejected(400, "corrupt_image", "the DICOM image has no rows or columns")
    if rows * columns > max_pixels:
        raise DicomRejected(413, "too_many_pixels", f"the image has {columns} x {rows} pixels; at most "
                            f"{max_pixels} are allowed")
    index = 0 if frame is None else frame
    if not 0 <= index < max(frames, 1):
        raise DicomRejected(422, "invalid_parameter", f"frame must be in [0, {max(frames, 1) - 1}] for this file "
                            f"({frames} frame{'s' if frames != 1 else ''})")
    _check_decodable(dataset)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    monochrome = photometric in ("MONOCHROME1", "MONOCHROME2")
    if request.given and not monochrome:
        raise DicomRejected(422, "invalid_parameter", f"window applies to greyscale images; this one is {photometric}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = pixel_array(dataset, index=index if frames > 1 else None)
        except MemoryError:
            raise DicomRejected(413, "too_many_pixels", "the DICOM image is too large to decode") from None
        except Exception as exc:
            logger.info("a DICOM upload's pixels could not be decoded (%s)", type(exc).__name__)  # no values
            syntax = dataset.file_meta.TransferSyntaxUID
            if syntax.is_compressed:  # a variant the installed decoders do not handle (e.g. some 12-bit JPEG)
                raise DicomRejected(415, "unsupported_transfer_syntax", f"the installed decoders could not decode "
                                    f"this file's {_syntax_name(syntax)} pixel data; send it uncompressed") from None
            raise DicomRejected(400, "corrupt_image", "the DICOM pixel data is corrupt or truncated") from None
    if monochrome:
        if values.ndim != 2:
            raise DicomRejected(400, "corrupt_image", "the DICOM greyscale frame is not two-dimensional")
        levels, windowing = _greyscale(dataset, values, request, photometric == "MONOCHROME1")
        image = Image.fromarray(levels).convert("RGB")
    else:
        if photometric == "PALETTE COLOR" and values.ndim == 2:
            values = np.asarray(_palette(dataset, values))
        if values.ndim != 3 or values.shape[-1] != 3:
            raise DicomRejected(400, "corrupt_image", f"the DICOM colour frame has shape {tuple(values.shape)}")
        image, windowing = Image.fromarray(_colour(dataset, values), mode="RGB"), None
    return DicomImage(image, windowing, technical_facts(dataset, index))
