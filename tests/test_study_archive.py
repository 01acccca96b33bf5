"""Study archives: manifests are read right, and every hostile or broken upload is refused early.

Pure and fast: archives are built in memory, limits are shrunk so the guards trip on small data.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import warnings
import zipfile

import pytest
from PIL import Image

from app.study_archive import (
    ArchiveLimits,
    ArchiveRejected,
    ManifestRow,
    Region,
    _read_capped,
    read_archive,
)

LIMITS = ArchiveLimits()


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes] | list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    items = members.items() if isinstance(members, dict) else members
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names on purpose
        with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
            for name, content in items:
                archive.writestr(name, content)
    return buffer.getvalue()


def make_tar(members: dict[str, bytes] | list[tarfile.TarInfo | tuple[str, bytes]], gz: bool = False,
             fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    items = members.items() if isinstance(members, dict) else members
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w", format=fmt) as archive:
        for item in items:
            if isinstance(item, tarfile.TarInfo):
                archive.addfile(item)
                continue
            name, content = item
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def refused(data: bytes, limits: ArchiveLimits = LIMITS, status: int = 422, code: str = "unsafe_archive") -> str:
    """Assert ``data`` is refused with ``status`` and ``code``; the message, for further checks."""
    with pytest.raises(ArchiveRejected) as caught:
        read_archive(data, limits)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    return caught.value.message


def central_offsets(data: bytes) -> list[int]:
    """Where each central-directory file header starts."""
    offsets, start = [], 0
    while (found := data.find(b"PK\x01\x02", start)) >= 0:
        offsets.append(found)
        start = found + 4
    return offsets


# --- reading ---------------------------------------------------------------------------------


def test_zip_with_manifest_reads_targets_labels_and_regions() -> None:
    manifest = (
        " Path ,Target,label,region,Region_Kind,notes\n"
        "a.png,3,5,1 2 7 8,,first\n"
        "b.png,,,masks/m.png,forbidden,\n"
        "\n"
        "./a.png,7,,\"0, 0, 4.5, 4\",expected,again\n"
        "sub/c.JPG,,,,forbidden,kind without region is ignored\n"
    )
    data = make_zip({
        "manifest.csv": manifest.encode(),
        "a.png": png(), "b.png": png((0, 0, 255)), "sub/c.JPG": png(), "unused.png": png(),
        "masks/m.png": png((255, 255, 255)), "readme.txt": b"hello",
    })
    study = read_archive(data, LIMITS)
    assert study.has_manifest
    assert study.rows == [
        ManifestRow(line=2, path="a.png", target=3, label=5, region=Region("expected", box=(1.0, 2.0, 7.0, 8.0))),
        ManifestRow(line=3, path="b.png", region=Region("forbidden", mask="masks/m.png")),
        ManifestRow(line=5, path="a.png", target=7, region=Region("expected", box=(0.0, 0.0, 4.5, 4.0))),
        ManifestRow(line=6, path="sub/c.JPG"),
    ]
    assert set(study.files) == {"a.png", "b.png", "sub/c.JPG", "masks/m.png"}
    assert study.files["b.png"] == png((0, 0, 255))


def test_manifest_in_the_one_top_folder_with_bom_and_mac_junk() -> None:
    manifest = "\ufeffpath,target\nimg/a.png,1\n".encode()
    data = make_zip([
        ("study/", b""), ("study/manifest.csv", manifest), ("study/img/a.png", png()),
        ("study/img/b.png", png()), ("study/.DS_Store", b"junk"),
        ("__MACOSX/study/img/._a.png", b"junk"), ("study/img/._b.png", b"junk"),
    ])
    study = read_archive(data, LIMITS)
    assert study.has_manifest
    assert study.rows == [ManifestRow(line=2, path="study/img/a.png", target=1)]
    assert list(study.files) == ["study/img/a.png"]


@pytest.mark.parametrize("gz", [True, False], ids=["tar.gz", "tar"])
def test_tar_without_manifest_lists_every_image_by_path(gz: bool) -> None:
    data = make_tar({
        "b.png": png(), "./z.PNG": png(), "a//c.jpeg": png(), "notes.txt": b"x",
        "._b.png": b"junk", ".hidden/d.png": png(), "x/manifest.csv": b"path\nb.png\n",
    }, gz=gz)
    study = read_archive(data, LIMITS)
    assert not study.has_manifest
    assert study.rows == [ManifestRow(0, "a/c.jpeg"), ManifestRow(0, "b.png"), ManifestRow(0, "z.PNG")]
    assert set(study.files) == {"a/c.jpeg", "b.png", "z.PNG"}


def test_tar_directories_do_not_count_as_files() -> None:
    folder = tarfile.TarInfo("imgs")
    folder.type = tarfile.DIRTYPE
    data = make_tar([folder, ("imgs/a.png", png()), ("imgs/b.png", png())])
    study = read_archive(data, ArchiveLimits(max_files=2))
    assert [row.path for row in study.rows] == ["imgs/a.png", "imgs/b.png"]


# --- not an archive, broken archives ---------------------------------------------------------


def test_not_an_archive() -> None:
    assert "neither a zip nor a tar" in refused(png(), status=400, code="invalid_archive")
    refused(b"", status=400, code="invalid_archive")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive(kind: str) -> None:
    members = {"a.png": png(), "b.png": png((1, 2, 3))}
    data = make_zip(members) if kind == "zip" else make_tar(members, gz=True)
    refused(data[: len(data) // 2], status=400, code="invalid_archive")


def test_zip_crc_error_is_invalid() -> None:
    content = png()
    data = bytearray(make_zip({"a.png": content}, compression=zipfile.ZIP_STORED))
    at = data.find(content) + 20
    data[at] ^= 0xFF
    refused(bytes(data), status=400, code="invalid_archive")


# --- unsafe members --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:\\evil.png", "C:/evil.png",
                                  "a\\evil.png"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_escaping_paths_are_unsafe(name: str, kind: str) -> None:
    members = {"ok.png": png(), name: png()}
    data = make_zip(members) if kind == "zip" else make_tar(members)
    assert repr(name) in refused(data)


def test_nul_in_a_zip_name_is_unsafe() -> None:
    data = make_zip({"evilXname.png": png()}).replace(b"evilXname", b"evil\0name")
    assert "NUL" in refused(data)


def test_tar_links_and_devices_are_unsafe() -> None:
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE):
        link = tarfile.TarInfo("link.png")
        link.type = kind
        link.linkname = "/etc/passwd"
        assert "'link.png'" in refused(make_tar([("a.png", png()), link]))


def test_zip_symlink_is_unsafe() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", png())
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    assert "symbolic link" in refused(buffer.getvalue())


def test_encrypted_zip_member_is_unsafe() -> None:
    data = bytearray(make_zip({"a.png": png()}))
    for offset in [0] + central_offsets(bytes(data)):  # local header flag at +6, central at +8
        at = offset + (6 if offset == 0 else 8)
        data[at] |= 0x1
    assert "encrypted" in refused(bytes(data))


def test_duplicate_paths_are_unsafe() -> None:
    refused(make_zip([("a.png", png()), ("a.png", png())]))
    refused(make_tar([("a.png", png()), ("./a.png", png())]))


# --- limits ----------------------------------------------------------------------------------


def test_too_many_files_counting_junk() -> None:
    members = {"a.png": png(), "b.png": png(), "._a.png": b"", "notes.txt": b""}
    limits = ArchiveLimits(max_files=3)
    refused(make_zip(members), limits, 413, "archive_too_large")
    refused(make_tar(members), limits, 413, "archive_too_large")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_over_the_size_limit(kind: str) -> None:
    members = {"a.png": png(), "big.png": bytes(5000)}
    data = make_zip(members) if kind == "zip" else make_tar(members)
    assert "'big.png'" in refused(data, ArchiveLimits(max_member_bytes=4000), 413, "archive_too_large")


def test_total_over_the_limit() -> None:
    members = {f"{i}.png": bytes(600) for i in range(3)}
    limits = ArchiveLimits(max_total_bytes=1000)
    refused(make_zip(members), limits, 413, "archive_too_large")
    refused(make_tar(members, gz=True), limits, 413, "archive_too_large")


def test_zip_bomb_is_caught_by_the_ratio() -> None:
    data = make_zip({"bomb.png": bytes(3 * 1024 * 1024)})
    limits = ArchiveLimits(max_member_bytes=10 * 1024 * 1024, max_ratio=200)
    assert "zip bomb" in refused(data, limits, 413, "archive_too_large")


def test_zip_member_lying_about_its_size_is_refused() -> None:
    content = bytes(3 * 1024 * 1024)
    data = bytearray(make_zip({"a.png": png(), "liar.png": content}))
    for offset in central_offsets(bytes(data))[1:]:
        struct.pack_into("<I", data, offset + 24, 100)  # uncompressed size in the central directory
    # zipfile stops at the declared size, so the CRC no longer matches: never more is inflated
    assert "'liar.png'" in refused(bytes(data), ArchiveLimits(max_member_bytes=1024 * 1024), 400, "invalid_archive")


def test_read_cap_holds_whatever_the_header_said() -> None:
    with pytest.raises(ArchiveRejected) as caught:
        _read_capped(io.BytesIO(bytes(5000)), "liar.png", 4000)
    assert (caught.value.status, caught.value.code) == (413, "archive_too_large")
    assert _read_capped(io.BytesIO(bytes(4000)), "fine.png", 4000) == bytes(4000)


def test_tar_gz_header_bomb_is_bounded() -> None:
    long_name = tarfile.TarInfo("a" * (4 * 1024 * 1024) + ".png")  # a GNU long-name header, read whole
    data = make_tar([long_name], gz=True, fmt=tarfile.GNU_FORMAT)
    assert len(data) < 100_000
    refused(data, ArchiveLimits(max_files=2, max_total_bytes=1024 * 1024), 413, "archive_too_large")


# --- manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize(("manifest", "expected"), [
    ("path,target\na.png,1\nb.png,2\na.png,x\n", "manifest.csv line 4: target must be a non-negative integer, got 'x'"),
    ("path,label\na.png,-1\n", "line 2: label must be a non-negative integer"),
    ("path,region\na.png,1 2 3\n", "line 2: region must be four numbers"),
    ("path,region\na.png,5 5 1 1\n", "line 2: region box needs x1 > x0"),
    ("path,region\na.png,-1 0 3 3\n", "line 2: region box needs"),
    ("path,region,region_kind\na.png,1 1 3 3,maybe\n", "line 2: region_kind must be 'expected' or 'forbidden'"),
    ("path,region\na.png,masks/none.png\n", "line 2: region mask 'masks/none.png' is not an image file"),
    ("file,target\na.png,1\n", "line 1: the header row has no 'path' column"),
    ("path,target,Target\na.png,1,2\n", "line 1: column 'target' appears twice"),
    ("path\n../a.png\n", "line 2: path '../a.png' has a '..' component"),
    ("path\n/a.png\n", "line 2: path '/a.png' has an absolute path"),
    ("path\na.png\nmissing.png\n", "line 3: path 'missing.png' is not an image file in the archive"),
    ("path\nnotes.txt\n", "line 2: path 'notes.txt' is not an image file"),
    ("path,target\na.png,\n,1\n", "line 3: path is empty"),
    ("path,target\na.png,1,extra\n", "line 2: 3 fields, but the header has 2"),
    ("", "line 1: the header row is missing"),
])
def test_manifest_errors_name_line_and_column(manifest: str, expected: str) -> None:
    data = make_zip({"manifest.csv": manifest.encode(), "a.png": png(), "b.png": png(), "notes.txt": b"x"})
    assert expected in refused(data, code="invalid_manifest")


def test_manifest_must_be_utf8_and_small() -> None:
    bad_text = make_zip({"manifest.csv": b"path\na.png\n\xff.png\n", "a.png": png()})
    assert "line 3" in refused(bad_text, code="invalid_manifest")
    huge = make_zip({"manifest.csv": b"path\n" + b"a.png\n" * 200_000, "a.png": png()}, compression=zipfile.ZIP_STORED)
    assert "larger than" in refused(huge, code="invalid_manifest")


def test_manifest_with_more_rows_than_files_allowed() -> None:
    data = make_zip({"manifest.csv": b"path\n" + b"a.png\n" * 4, "a.png": png()})
    refused(data, ArchiveLimits(max_files=3), 413, "archive_too_large")


def test_same_image_on_several_rows_is_read_once() -> None:
    data = make_tar({"manifest.csv": b"path,target\na.png,1\na.png,2\n", "a.png": png()}, gz=True)
    study = read_archive(data, LIMITS)
    assert [(row.line, row.target) for row in study.rows] == [(2, 1), (3, 2)]
    assert list(study.files) == ["a.png"]


# --- nothing to explain ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    make_zip({}), make_tar({}), make_tar({}, gz=True), make_zip({"notes.txt": b"x", "._a.png": b""}),
    make_zip({"manifest.csv": b"path,target\n\n", "a.png": png()}),
], ids=["empty zip", "empty tar", "empty tar.gz", "no images", "manifest without rows"])
def test_empty_study(data: bytes) -> None:
    assert "no images" in refused(data, code="empty_study")


def test_empty_zip_is_recognised_by_content() -> None:
    assert make_zip({}).startswith(b"PK\x05\x06")
    assert gzip.decompress(make_tar({}, gz=True)).strip(b"\0") == b""
