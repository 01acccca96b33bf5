"""Windowing: high-bit-depth greyscale values (a radiograph, a CT slice) to the 8 bits a model sees.

A window is a centre ``C`` and a width ``W`` in the data's own units (Hounsfield units after a
CT's rescale). The mapping is DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), which every
viewer a clinician uses applies the same way::

    x <= C - 0.5 - (W - 1) / 2      -> 0
    x >  C - 0.5 + (W - 1) / 2      -> 255
    otherwise                       -> ((x - (C - 0.5)) / (W - 1) + 0.5) * 255

(``SIGMOID`` is the standard's other function: ``255 / (1 + exp(-4 (x - C) / W))``.)

Where the window comes from, first that applies (``Windowing.source`` says which):

- ``request``: the client's ``window=C,W``;
- ``auto``: the client's ``window=auto``: the 0.5th to 99.5th percentile of the pixels, robust to
  markers and collimator edges;
- ``file_voi_lut`` / ``file_window``: a DICOM file's own VOI LUT, or its first Window Center /
  Width;
- ``stored_bits``: the range a PNG's ``sBIT`` chunk says its values use: ``0 .. 2**bits - 1``;
- ``data_range``: the pixels' own minimum to maximum, when nothing else is known.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from core.errors import UnboxError

WindowSource = Literal["request", "auto", "file_voi_lut", "file_window", "stored_bits", "data_range"]
AUTO_PERCENTILES = (0.5, 99.5)
_WINDOW_TEXT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*$")


class WindowRefused(UnboxError):
    """A ``window`` the request cannot use (code ``invalid_parameter``)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_parameter", message)


@dataclass(frozen=True)
class WindowRequest:
    """What the client asked for: nothing (``None`` fields), ``auto``, or a centre and width."""

    auto: bool = False
    center: float | None = None
    width: float | None = None

    @property
    def given(self) -> bool:
        return self.auto or self.center is not None


NO_WINDOW = WindowRequest()


def parse_window(text: str | None) -> WindowRequest:
    """``C,W`` (numbers, W >= 1), ``auto``, or empty; anything else is ``invalid_parameter``."""
    if text is None or not text.strip():
        return NO_WINDOW
    if text.strip().lower() == "auto":
        return WindowRequest(auto=True)
    match = _WINDOW_TEXT.match(text)
    if match is None or float(match.group(2)) < 1:
        raise WindowRefused("window must be 'C,W' (centre and width in the data's units, width >= 1, e.g. "
                            "'40,400' for a CT soft-tissue window) or 'auto'")
    return WindowRequest(center=float(match.group(1)), width=float(match.group(2)))


@dataclass(frozen=True)
class Windowing:
    """The window applied to an image, as responses report it."""

    source: WindowSource
    center: float
    width: float
    function: Literal["LINEAR", "SIGMOID", "LUT"] = "LINEAR"
    inverted: bool = False  # MONOCHROME1: low values are bright

    def as_json(self) -> dict[str, Any]:
        facts = asdict(self)
        facts.update(center=round(self.center, 4), width=round(self.width, 4))
        return facts


def range_window(low: float, high: float, source: WindowSource) -> Windowing:
    """The window that maps ``low .. high`` onto 0 .. 255."""
    width = max(float(high) - float(low) + 1.0, 1.0)
    return Windowing(source, float(low) + width / 2.0, width)


def chosen_window(values: np.ndarray, request: WindowRequest, stored_bits: int | None = None,
                  file_window: tuple[float, float] | None = None) -> Windowing:
    """The window for ``values``: the request's, else the file's, else the stored bits', else the data's range."""
    if request.center is not None and request.width is not None:
        return Windowing("request", request.center, request.width)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return Windowing("data_range", 0.5, 1.0)
    if request.auto:
        low, high = np.percentile(finite, AUTO_PERCENTILES)
        return range_window(float(low), float(high), "auto")
    if file_window is not None:
        return Windowing("file_window", *file_window)
    if stored_bits:
        return range_window(0.0, float(2 ** stored_bits - 1), "stored_bits")
    return range_window(float(finite.min()), float(finite.max()), "data_range")


def apply_window(values: np.ndarray, window: Windowing) -> np.ndarray:
    """8-bit levels of ``values`` under ``window`` (linear or sigmoid), inverted when it says so."""
    x = np.nan_to_num(values.astype(np.float64), nan=0.0)
    c, w = window.center, max(window.width, 1.0)
    if window.function == "SIGMOID":
        levels = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif w <= 1.0:
        levels = np.where(x > c - 0.5, 255.0, 0.0)
    else:
        levels = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    levels = np.clip(levels + 0.5, 0, 255).astype(np.uint8)
    return 255 - levels if window.inverted else levels
