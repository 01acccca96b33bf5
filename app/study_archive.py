"""Safe reading of a study upload: a zip or tar archive of images with an optional manifest.csv.

A study is many images explained in one request. The upload is treated as hostile, so
:func:`read_archive` keeps to the rules below and refuses everything else with
:class:`ArchiveRejected` (an HTTP status, a stable code, a message naming the culprit).

Format, by content and never by name
    zip (``PK\\x03\\x04``, or ``PK\\x05\\x06`` for an empty zip), plain tar (a first header
    whose checksum adds up, or the zero blocks of an empty tar) or gzip-compressed tar.
    Anything else, and any corrupt or truncated archive: 400 ``invalid_archive``.

Work is bounded before it is done (:class:`ArchiveLimits`): 413 ``archive_too_large``
    Too many files (every file counts, junk included; directories do not), a member whose
    declared or actually read size is too big, too many bytes in all, a zip member that
    expands more than ``max_ratio``-fold (judged once it is over 1 MiB: a zip bomb). Zip
    members are read in chunks that stop at the caps whatever their headers claim; a tar
    is read as a stream through a reader that refuses to decompress more than the total
    limit plus a small margin for headers, so even a huge tar header cannot inflate.

Members that could escape or confuse: 422 ``unsafe_archive``
    Absolute paths (``/x``, ``C:\\x``, ``C:/x``), ``..`` components, backslashes, NUL bytes,
    empty names, symbolic and hard links, devices, fifos, sockets, encrypted zip members
    and two members with the same normalised path.

Paths
    Normalised (``./a//b`` is ``a/b``). Directory entries are skipped. macOS junk
    (``__MACOSX/...``, ``._x``) and hidden files or folders (a path part starting with ``.``)
    count towards ``max_files`` but are otherwise ignored. Image files are told by extension
    (:data:`IMAGE_EXTENSIONS`); they are not decoded here: the caller decodes each one and
    reports an unreadable one as a failed item.

manifest.csv (optional)
    ``manifest.csv`` at the root or, when every (non-junk) file lies in one top-level folder,
    ``<folder>/manifest.csv``; its paths are relative to its own folder. UTF-8 (a BOM is
    fine), at most 1 MiB, a header row naming ``path`` and optionally ``target``, ``label``,
    ``region`` (``x0 y0 x1 y1`` in pixels, or the path of a mask image) and ``region_kind``
    (``expected`` or ``forbidden``); other columns are ignored. Each mistake is a 422
    ``invalid_manifest`` naming the line and the column. More rows than ``max_files``: 413.

No manifest
    Every image file, sorted by path. No rows at all: 422 ``empty_study``.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import posixpath
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

from core.errors import UnboxError

try:  # zipfile reads LZMA members only when the interpreter has lzma; so must we
    from lzma import LZMAError as _LZMAError
except ImportError:  # pragma: no cover - a Python built without lzma
    _LZMAError = zlib.error

# what a damaged compressed member raises (bz2 raises OSError, caught separately)
_DECOMPRESSION_ERRORS: tuple[type[Exception], ...] = (zlib.error, _LZMAError)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".dcm"})
MANIFEST_NAME = "manifest.csv"
MAX_MANIFEST_BYTES = 1024 * 1024
RATIO_FLOOR = 1024 * 1024  # a zip member's expansion ratio is only judged above this size
MANIFEST_COLUMNS = ("path", "target", "label", "region", "region_kind")

_CHUNK = 1024 * 1024
_TAR_MARGIN = 1024 * 1024  # decompressed bytes allowed beyond the data: headers and padding ...
_TAR_MARGIN_PER_ENTRY = 4096  # ... plus this much for each entry the archive may hold
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_DRIVE = re.compile(r"[A-Za-z]:")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"\d{1,18}")
_REGION_SEPARATORS = re.compile(r"[\s,]+")


class ArchiveRejected(UnboxError):
    """An upload that cannot be used as a study; ``status``, ``code`` and ``message`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int = 2000  # members that are files, images or not; directories don't count
    max_member_bytes: int = 20 * 1024 * 1024  # uncompressed size of one member
    max_total_bytes: int = 1024 * 1024 * 1024  # uncompressed size of them all
    max_ratio: float = 200.0  # uncompressed / compressed of one zip member over RATIO_FLOOR


@dataclass(frozen=True)
class Region:
    kind: Literal["expected", "forbidden"]
    box: tuple[float, float, float, float] | None = None  # x0 y0 x1 y1 in the image's pixels
    mask: str | None = None  # archive path of a mask image


@dataclass(frozen=True)
class ManifestRow:
    line: int  # line in manifest.csv (1 is the header); 0 without a manifest
    path: str  # normalised archive path of the image
    target: int | None = None
    label: int | None = None
    region: Region | None = None


@dataclass(frozen=True)
class StudyArchive:
    rows: list[ManifestRow]  # what to explain, in manifest order (else every image, by path)
    files: dict[str, bytes]  # the bytes of every image and mask the rows refer to, by path
    has_manifest: bool


def read_archive(data: bytes, limits: ArchiveLimits) -> StudyArchive:
    """The study in ``data``, or :class:`ArchiveRejected` for anything unsafe or unusable."""
    if _archive_format(data) == "zip":
        members = _scan_zip(data, limits)
    else:
        members = _scan_tar(data, limits)
    return _build_study(members, limits)


# --- refusals ------------------------------------------------------------------------------


def _invalid_archive(message: str = "the archive is corrupt or truncated") -> ArchiveRejected:
    return ArchiveRejected(400, "invalid_archive", message)


def _too_large(message: str) -> ArchiveRejected:
    return ArchiveRejected(413, "archive_too_large", message)


def _unsafe(name: str, problem: str) -> ArchiveRejected:
    return ArchiveRejected(422, "unsafe_archive", f"member {_show(name)} {problem}")


def _bad_manifest(message: str) -> ArchiveRejected:
    return ArchiveRejected(422, "invalid_manifest", message)


def _show(text: str) -> str:
    """``text`` quoted for a message, cut short when absurdly long (names are attacker-chosen)."""
    shown = repr(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


# --- paths ---------------------------------------------------------------------------------


def _path_problem(name: str) -> str | None:
    """Why ``name`` is unsafe as a path inside an archive, or None when it is fine."""
    if not name:
        return "has an empty name"
    if "\0" in name:
        return "has a NUL byte in its name"
    if "\\" in name:
        return "has a backslash in its name"
    if name.startswith("/") or _DRIVE.match(name):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "has a '..' component in its path"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "has a name that is not valid text"
    return None


def _normalise(name: str) -> str:
    """``./a//b/./c`` as ``a/b/c``: the one spelling used for duplicates and look-ups."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _is_junk(path: str) -> bool:
    """macOS resource forks (``__MACOSX/``, ``._x``) and hidden files or folders: never used."""
    parts = path.split("/")
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def _is_image_path(path: str) -> bool:
    """Whether ``path`` names an image file by its extension (the caller decodes it later)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


# --- members, whatever the format ----------------------------------------------------------


@dataclass
class _Members:
    """What a scan found: the usable (non-junk) file paths, and a bounded reader for them."""

    paths: list[str]
    load: Callable[[str], bytes]


class _Tally:
    """Counts entries, files and declared bytes as members are met, refusing at the first excess."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.files = 0
        self.declared = 0
        self.seen: set[str] = set()

    @property
    def max_entries(self) -> int:
        """Entries of any kind, directories included: bounds the work on directory-only floods."""
        return 2 * self.limits.max_files + 100

    def entry(self, name: str, is_dir: bool) -> str | None:
        """Check one member's name; its normalised path, or None for a directory to skip."""
        self.entries += 1
        if self.entries > self.max_entries:
            raise _too_large(f"the archive has more than {self.max_entries} entries")
        problem = _path_problem(name)
        if problem:
            raise _unsafe(name, problem)
        path = _normalise(name)
        if is_dir:
            return None
        if not path:
            raise _unsafe(name, "has an empty name")
        return path

    def file(self, name: str, path: str, size: int) -> None:
        """Count one file member of declared ``size``; refuse excess files, bytes or a duplicate."""
        limits = self.limits
        self.files += 1
        if self.files > limits.max_files:
            raise _too_large(f"the archive has more than {limits.max_files} files")
        if size > limits.max_member_bytes:
            raise _too_large(f"member {_show(name)} is larger than {limits.max_member_bytes} bytes uncompressed")
        self.declared += size
        if self.declared > limits.max_total_bytes:
            raise _too_large(f"the archive holds more than {limits.max_total_bytes} bytes uncompressed")
        if path in self.seen:
            raise _unsafe(name, f"repeats the path {_show(path)}")
        self.seen.add(path)


def _read_capped(stream: BinaryIO, name: str, cap: int, check: Callable[[int], None] | None = None) -> bytes:
    """All of ``stream`` in chunks, never more than ``cap + 1`` bytes, whatever headers claimed.

    ``check`` sees the running size after each chunk, to refuse early (ratio, total)."""
    chunks: list[bytes] = []
    got = 0
    while True:
        chunk = stream.read(min(_CHUNK, cap + 1 - got))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
        if got > cap:
            raise _too_large(f"member {_show(name)} is larger than {cap} bytes uncompressed")
        if check is not None:
            check(got)


# --- format --------------------------------------------------------------------------------


def _archive_format(data: bytes) -> Literal["zip", "tar"]:
    """``zip`` or ``tar`` (plain or gzip-compressed) by the bytes themselves, else a 400."""
    if data.startswith(_ZIP_SIGNATURES):
        return "zip"
    if data.startswith(_GZIP_MAGIC) or _looks_like_tar(data):
        return "tar"
    raise _invalid_archive("the archive is neither a zip nor a tar file")


def _looks_like_tar(data: bytes) -> bool:
    """A first tar header whose checksum adds up (ustar, GNU and v7 alike), or an empty tar."""
    if len(data) < 512:
        return False
    header = data[:512]
    if not header.strip(b"\0"):
        return len(data) >= 1024 and not data[512:1024].strip(b"\0")
    field = header[148:156].replace(b"\0", b" ").strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    stored = int(field, 8)
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


# --- zip -----------------------------------------------------------------------------------


def _zip_kind_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member's Unix mode makes it unusable (a link, a device), or None."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return None
    if kind == stat.S_IFLNK:
        return "is a symbolic link"
    return "is a device, fifo or socket"


def _check_ratio(name: str, size: int, compressed: int, limits: ArchiveLimits) -> None:
    """Refuse a zip member that expands suspiciously (judged only above :data:`RATIO_FLOOR`)."""
    if size <= RATIO_FLOOR:
        return
    ratio = size / max(compressed, 1)
    if ratio > limits.max_ratio:
        raise _too_large(f"member {_show(name)} expands {ratio:.0f}-fold; it looks like a zip bomb")


def _scan_zip(data: bytes, limits: ArchiveLimits) -> _Members:
    """Check every zip member from the central directory; read nothing until asked."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except NotImplementedError as exc:  # e.g. a zip version newer than zipfile can read
        raise _invalid_archive(f"the zip uses features that are not supported ({exc})") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error) as exc:
        raise _invalid_archive() from exc
    tally = _Tally(limits)
    if len(infos) > tally.max_entries:
        raise _too_large(f"the archive has more than {tally.max_entries} entries")
    usable: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.orig_filename
        path = tally.entry(name, name.endswith("/"))  # not info.is_dir(): it fails on an empty name
        problem = _zip_kind_problem(info)
        if problem:
            raise _unsafe(name, problem)
        if path is None:
            continue
        if info.flag_bits & 0x1:
            raise _unsafe(name, "is encrypted; encrypted members are not supported")
        tally.file(name, path, info.file_size)
        _check_ratio(name, info.file_size, info.compress_size, limits)
        if not _is_junk(path):
            usable[path] = info
    used = [0]  # bytes actually read so far, across members

    def load(path: str) -> bytes:
        content = _read_zip_member(archive, usable[path], limits, used[0])
        used[0] += len(content)
        return content

    return _Members(list(usable), load)


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits, used: int) -> bytes:
    """One member's bytes, stopping at the member, ratio and total limits; CRC checked at the end."""
    name = info.orig_filename

    def check(got: int) -> None:
        _check_ratio(name, got, info.compress_size, limits)
        if used + got > limits.max_total_bytes:
            raise _too_large(f"the archive holds more than {limits.max_total_bytes} bytes uncompressed")

    try:
        with archive.open(info) as stream:
            return _read_capped(stream, name, limits.max_member_bytes, check)
    except NotImplementedError as exc:
        raise _invalid_archive(f"member {_show(name)} uses an unsupported compression method") from exc
    except (zipfile.BadZipFile, *_DECOMPRESSION_ERRORS, EOFError, OSError, ValueError, RuntimeError) as exc:
        raise _invalid_archive(f"member {_show(name)} is corrupt or truncated") from exc


# --- tar -----------------------------------------------------------------------------------


class _BoundedReader:
    """A read-only stream that refuses (413) once more than ``budget`` bytes came out of ``raw``.

    Over a gzip stream it bounds decompression itself: tarfile reads headers (pax, GNU long
    names) whole, so the member sizes alone cannot bound what a hostile tar.gz inflates to."""

    def __init__(self, raw: BinaryIO, budget: int, total_limit: int) -> None:
        self._raw = raw
        self._budget = budget
        self._total_limit = total_limit
        self._used = 0

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (everything left within the budget when negative)."""
        room = self._budget - self._used + 1
        chunk = self._raw.read(room if size is None or size < 0 else min(size, room))
        self._used += len(chunk)
        if self._used > self._budget:
            raise _too_large(f"the archive holds more than {self._total_limit} bytes uncompressed")
        return chunk


def _tar_kind_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member's type makes it unusable (a link, a device, something odd), or None."""
    if member.issym():
        return "is a symbolic link"
    if member.islnk():
        return "is a hard link"
    if member.ischr() or member.isblk() or member.isfifo():
        return "is a device or fifo"
    if member.isdir() or member.isreg():
        return None
    return "has an unsupported member type"


def _may_be_manifest(path: str) -> bool:
    """Whether ``path`` is where a manifest could be: the root, or one folder down."""
    return path == MANIFEST_NAME or (path.count("/") == 1 and path.endswith("/" + MANIFEST_NAME))


def _scan_tar(data: bytes, limits: ArchiveLimits) -> _Members:
    """Stream the tar once, checking each member and keeping the images and manifest candidates."""
    raw: BinaryIO = gzip.GzipFile(fileobj=io.BytesIO(data)) if data.startswith(_GZIP_MAGIC) else io.BytesIO(data)
    tally = _Tally(limits)
    budget = limits.max_total_bytes + _TAR_MARGIN + _TAR_MARGIN_PER_ENTRY * tally.max_entries
    stream = _BoundedReader(raw, budget, limits.max_total_bytes)
    paths: list[str] = []
    kept: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # a stream: read once, in order
            for member in archive:
                path = tally.entry(member.name, member.isdir())
                problem = _tar_kind_problem(member)
                if problem:
                    raise _unsafe(member.name, problem)
                if path is None:
                    continue
                tally.file(member.name, path, member.size)
                if _is_junk(path):
                    continue
                paths.append(path)
                if _is_image_path(path) or _may_be_manifest(path):
                    extracted = archive.extractfile(member)
                    cap = limits.max_member_bytes
                    kept[path] = b"" if extracted is None else _read_capped(extracted, member.name, cap)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise _invalid_archive() from exc
    return _Members(paths, kept.__getitem__)


# --- the study -----------------------------------------------------------------------------


def _find_manifest(paths: list[str]) -> str | None:
    """``manifest.csv`` at the root, or in the one top-level folder holding every file."""
    present = set(paths)
    if MANIFEST_NAME in present:
        return MANIFEST_NAME
    if not paths or any("/" not in path for path in paths):
        return None
    folders = {path.split("/", 1)[0] for path in paths}
    if len(folders) != 1:
        return None
    candidate = f"{folders.pop()}/{MANIFEST_NAME}"
    return candidate if candidate in present else None


def _build_study(members: _Members, limits: ArchiveLimits) -> StudyArchive:
    """Rows from the manifest (or every image), and the bytes of exactly what they refer to."""
    images = {path for path in members.paths if _is_image_path(path)}
    manifest = _find_manifest(members.paths)
    if manifest is None:
        rows = [ManifestRow(line=0, path=path) for path in sorted(images)]
    else:
        rows = _parse_manifest(manifest, members.load(manifest), images, limits)
    if not rows:
        raise ArchiveRejected(422, "empty_study", "the archive has no images to explain")
    files: dict[str, bytes] = {}
    for row in rows:
        wanted = [row.path] + ([row.region.mask] if row.region and row.region.mask else [])
        for path in wanted:
            if path not in files:
                files[path] = members.load(path)
    return StudyArchive(rows=rows, files=files, has_manifest=manifest is not None)


# --- manifest.csv --------------------------------------------------------------------------


def _decode_manifest(name: str, data: bytes) -> str:
    """The manifest's text: UTF-8, an optional BOM, at most :data:`MAX_MANIFEST_BYTES`."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _bad_manifest(f"{name} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _bad_manifest(f"{name} line {line}: the text is not valid UTF-8") from exc


def _header_columns(name: str, header: list[str]) -> dict[str, int]:
    """Known column -> index from the header row (names case-insensitive, spaces stripped)."""
    columns: dict[str, int] = {}
    for index, cell in enumerate(header):
        key = cell.strip().lower()
        if key not in MANIFEST_COLUMNS:
            continue
        if key in columns:
            raise _bad_manifest(f"{name} line 1: column {key!r} appears twice")
        columns[key] = index
    if "path" not in columns:
        raise _bad_manifest(f"{name} line 1: the header row has no 'path' column")
    return columns


def _parse_manifest(name: str, data: bytes, images: set[str], limits: ArchiveLimits) -> list[ManifestRow]:
    """The manifest's rows, each checked; the first mistake is refused naming line and column."""
    reader = csv.reader(io.StringIO(_decode_manifest(name, data), newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise _bad_manifest(f"{name} line 1: {exc}") from exc
    if header is None:
        raise _bad_manifest(f"{name} line 1: the header row is missing")
    columns = _header_columns(name, header)
    context = _RowContext(name, posixpath.dirname(name), images, columns, len(header))
    rows: list[ManifestRow] = []
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            raise _bad_manifest(f"{name} line {line}: {exc}") from exc
        if cells is None:
            return rows
        if not any(cell.strip() for cell in cells):
            continue
        if len(rows) >= limits.max_files:
            raise _too_large(f"{name} has more than {limits.max_files} rows")
        rows.append(context.row(line, cells))


@dataclass(frozen=True)
class _RowContext:
    """What checking one manifest row needs: where the manifest is, its columns, the images."""

    name: str
    folder: str
    images: set[str]
    columns: dict[str, int]
    width: int

    def fail(self, line: int, message: str) -> ArchiveRejected:
        return _bad_manifest(f"{self.name} line {line}: {message}")

    def row(self, line: int, cells: list[str]) -> ManifestRow:
        """One data row as a :class:`ManifestRow`, or the refusal of its first bad cell."""
        if any(cell.strip() for cell in cells[self.width :]):
            raise self.fail(line, f"{len(cells)} fields, but the header has {self.width}")

        def cell(column: str) -> str:
            index = self.columns.get(column)
            return cells[index].strip() if index is not None and index < len(cells) else ""

        raw_path = cell("path")
        if not raw_path:
            raise self.fail(line, "path is empty")
        path = self.image(line, "path", raw_path)
        target = self.integer(line, "target", cell("target"))
        label = self.integer(line, "label", cell("label"))
        kind = self.region_kind(line, cell("region_kind"))
        region = self.region(line, cell("region"), kind)
        return ManifestRow(line=line, path=path, target=target, label=label, region=region)

    def image(self, line: int, column: str, raw: str) -> str:
        """The archive path of an image named relative to the manifest's folder."""
        problem = _path_problem(raw)
        if problem:
            raise self.fail(line, f"{column} {_show(raw)} {problem}")
        relative = _normalise(raw)
        path = f"{self.folder}/{relative}" if self.folder else relative
        if path not in self.images:
            what = "region mask" if column == "region" else column
            raise self.fail(line, f"{what} {_show(raw)} is not an image file in the archive")
        return path

    def integer(self, line: int, column: str, value: str) -> int | None:
        """A non-negative integer cell, None when empty."""
        if not value:
            return None
        if not _INTEGER.fullmatch(value):
            raise self.fail(line, f"{column} must be a non-negative integer, got {_show(value)}")
        return int(value)

    def region_kind(self, line: int, value: str) -> Literal["expected", "forbidden"]:
        """``expected`` (the default) or ``forbidden``."""
        kind = value.lower() or "expected"
        if kind == "expected":
            return "expected"
        if kind == "forbidden":
            return "forbidden"
        raise self.fail(line, f"region_kind must be 'expected' or 'forbidden', got {_show(value)}")

    def region(self, line: int, value: str, kind: Literal["expected", "forbidden"]) -> Region | None:
        """A box ``x0 y0 x1 y1`` (spaces or commas) or a mask image's path; None when empty."""
        if not value:
            return None
        tokens = _REGION_SEPARATORS.split(value)
        if not all(_NUMBER.fullmatch(token) for token in tokens):
            return Region(kind=kind, mask=self.image(line, "region", value))
        if len(tokens) != 4:
            raise self.fail(
                line, f"region must be four numbers 'x0 y0 x1 y1' or a mask image's path, got {_show(value)}"
            )
        x0, y0, x1, y1 = (float(token) for token in tokens)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or not (x1 > x0 >= 0 and y1 > y0 >= 0):
            raise self.fail(line, f"region box needs x1 > x0 >= 0 and y1 > y0 >= 0, got {_show(value)}")
        return Region(kind=kind, box=(x0, y0, x1, y1))


__all__ = [
    "IMAGE_EXTENSIONS",
    "ArchiveLimits",
    "ArchiveRejected",
    "ManifestRow",
    "Region",
    "StudyArchive",
    "read_archive",
]
