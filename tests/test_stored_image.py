"""Stored job images: pixels only, bit-identical to the API's decode, close to the upload's size.

Every upload goes through the API's real decoder (``app.intake.decode_image``); the blob must
decode to exactly those pixels, stay within 1.2x the upload, and hold none of the patient text
planted in EXIF, XMP, comments, ICC profiles or PNG text chunks.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, PngImagePlugin
from skimage import data as skdata

from app.intake import DecodedImage, decode_image
from workers import stored_image
from workers.stored_image import (HEADER_SIZE, Kind, StoredImageError, decode_stored, encode_for_storage,
                                  stored_kind)

LIMIT = 100_000_000
PATIENT = b"DOE^JANE"
#: Byte strings that must never reach Redis: patient text, a tag's text, metadata signatures
#: (long enough not to occur by chance in compressed pixels; chunk names are checked by walking).
SECRETS = (PATIENT, b"Artist", b"MRN-0042", b"patient note", b"adobe:ns:meta", b"Exif\x00\x00",
           b"ICC_PROFILE", b"mntrRGB XYZ ")
#: The only container parts a blob's payload may have.
ALLOWED_PARTS = {"APP0", "APP14", "IHDR", "PLTE", "tRNS", "IDAT", "IEND", "VP8X", "VP8 ", "VP8L", "ALPH"}
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
       b'22-rdf-syntax-ns#"><rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/">'
       b"<dc:creator>DOE^JANE</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>")
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# --- inputs ------------------------------------------------------------------------------


def photo(name: str = "coffee", size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skdata, name)())
    return image.resize(size, Image.Resampling.BICUBIC) if size else image


def patient_exif(orientation: int = 6) -> Image.Exif:
    """EXIF with an orientation and the text fields a clinic's camera or PACS fills in."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.ImageDescription] = "DOE^JANE MRN-0042"
    exif[ExifTags.Base.Artist] = "Artist of record"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = b"ASCII\x00\x00\x00patient note DOE^JANE"
    return exif


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def patient_jpeg(image: Image.Image, orientation: int = 6, **options: object) -> bytes:
    """A JPEG carrying EXIF (orientation + patient text), XMP, a COM comment and an ICC profile."""
    return encoded(image, "JPEG", quality=90, exif=patient_exif(orientation), xmp=XMP,
                   comment=b"patient note DOE^JANE", icc_profile=ICC, **options)


def patient_png_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "DOE^JANE")
    info.add_text("Comment", "patient note MRN-0042", zip=True)
    info.add_itxt("Description", "DOE^JANE MRN-0042")
    return info


# --- checks -------------------------------------------------------------------------------


def png_chunks(payload: bytes) -> list[str]:
    names, pos = [], 8
    while pos + 8 <= len(payload):
        length, name = struct.unpack(">I4s", payload[pos:pos + 8])
        names.append(name.decode("latin-1"))
        pos += 12 + length
    return names


def webp_chunks(payload: bytes) -> list[str]:
    names, pos = [], 12
    while pos + 8 <= len(payload):
        name, length = struct.unpack("<4sI", payload[pos:pos + 8])
        names.append(name.decode("latin-1"))
        pos += 8 + length + (length & 1)
    return names


def container_parts(blob: bytes) -> list[str]:
    """The payload's JPEG APPn/COM segments, PNG chunks or WebP chunks, by name."""
    payload = blob[HEADER_SIZE:]
    if payload.startswith(b"\xff\xd8"):
        with Image.open(io.BytesIO(payload)) as image:
            return [name for name, _ in image.applist]
    if payload.startswith(b"\x89PNG"):
        return png_chunks(payload)
    assert payload.startswith(b"RIFF"), payload[:16]
    return webp_chunks(payload)


def decode(data: bytes) -> DecodedImage:
    return decode_image(data, LIMIT)


def round_trip(data: bytes, max_ratio: float = 1.2) -> bytes:
    """Encode ``data`` as the API would; assert identity, size and no leaked metadata."""
    decoded = decode(data)
    blob = encode_for_storage(data, decoded.image, decoded.format)
    back = decode_stored(blob)
    assert back.mode == "RGB"
    assert back.size == decoded.image.size
    assert np.array_equal(np.asarray(back), np.asarray(decoded.image))
    assert len(blob) <= max_ratio * len(data), (len(blob), len(data))
    leaked = [secret for secret in SECRETS if secret in blob]
    assert not leaked, leaked
    assert set(container_parts(blob)) <= ALLOWED_PARTS, container_parts(blob)
    return blob


# --- JPEG -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_jpeg_photo_keeps_its_jpeg_bytes_without_metadata(name: str) -> None:
    data = patient_jpeg(photo(name))
    assert PATIENT in data and b"Artist" in data and b"patient note" in data
    blob = round_trip(data)
    assert stored_kind(blob) is Kind.JPEG_STRIPPED
    assert decode(data).image.size == photo(name).size[::-1]  # orientation 6 was applied


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_round_trips(orientation: int) -> None:
    blob = round_trip(patient_jpeg(photo("chelsea", (120, 80)), orientation))
    assert stored_kind(blob) is Kind.JPEG_STRIPPED


def test_xmp_only_orientation_round_trips() -> None:
    """Pillow also reads tiff:Orientation from XMP; the stored op must follow it."""
    xmp = XMP.replace(b"<rdf:Description ", b'<rdf:Description tiff:Orientation="8" ')
    data = encoded(photo("chelsea", (120, 80)), "JPEG", quality=90, xmp=xmp)
    assert decode(data).image.size == (80, 120)
    assert stored_kind(round_trip(data)) is Kind.JPEG_STRIPPED


@pytest.mark.parametrize("variant", ["progressive", "grayscale", "cmyk", "restart_markers"])
def test_jpeg_variants_round_trip(variant: str) -> None:
    image = photo("coffee")
    options: dict[str, object] = {}
    if variant == "progressive":
        options["progressive"] = True
    elif variant == "grayscale":
        image = image.convert("L")
    elif variant == "cmyk":
        image = image.convert("CMYK")
    else:
        options["restart_marker_blocks"] = 4
    data = patient_jpeg(image, **options)
    assert decode(data).original_mode == image.mode
    if variant == "restart_markers":
        assert b"\xff\xd0" in data and b"\xff\xd7" in data
    blob = round_trip(data)
    assert stored_kind(blob) is Kind.JPEG_STRIPPED
    if variant == "cmyk":
        assert b"Adobe" in blob  # APP14 decides the CMYK inversion, so it stays


def test_pillow_does_not_apply_icc_profiles() -> None:
    """Dropping ICC is safe: an XYZ profile, which would change every pixel if applied, does not."""
    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()
    plain = encoded(photo("coffee"), "JPEG", quality=90)
    tagged = encoded(photo("coffee"), "JPEG", quality=90, icc_profile=xyz)
    assert np.array_equal(np.asarray(decode(plain).image), np.asarray(decode(tagged).image))
    assert stored_kind(round_trip(tagged)) is Kind.JPEG_STRIPPED


def test_mpo_keeps_only_its_first_frame() -> None:
    frames = [photo("coffee"), photo("coffee").transpose(Image.Transpose.ROTATE_180)]
    data = encoded(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=90,
                   exif=patient_exif(1))
    assert decode(data).format == "MPO"
    blob = round_trip(data)
    assert stored_kind(blob) is Kind.JPEG_STRIPPED
    assert len(blob) < 0.7 * len(data)


# --- PNG, WebP, GIF, BMP, TIFF ----------------------------------------------------------------


def test_png_with_alpha_and_patient_text_keeps_its_pixel_chunks() -> None:
    rgba = photo("chelsea").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    data = encoded(rgba, "PNG", pnginfo=patient_png_info(), icc_profile=ICC, exif=patient_exif(6))
    assert PATIENT in data
    decoded = decode(data)
    assert decoded.image.size == rgba.size[::-1]  # the eXIf orientation was applied
    blob = round_trip(data)
    assert stored_kind(blob) is Kind.PNG_STRIPPED


def test_palette_png_with_transparency_round_trips() -> None:
    data = encoded(photo("chelsea").quantize(64), "PNG", transparency=0, pnginfo=patient_png_info())
    assert stored_kind(round_trip(data)) is Kind.PNG_STRIPPED


def test_16_bit_grayscale_png_is_re_encoded_losslessly() -> None:
    gray16 = Image.fromarray(skdata.camera().astype(np.uint16) * 257)
    data = encoded(gray16, "PNG", pnginfo=patient_png_info(), icc_profile=ICC)
    assert decode(data).original_mode.startswith("I")
    assert stored_kind(round_trip(data)) is Kind.WEBP_LOSSLESS


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_keeps_its_pixel_chunks(lossless: bool) -> None:
    image = photo("coffee").convert("RGBA") if lossless else photo("coffee")
    data = encoded(image, "WEBP", lossless=lossless, quality=80, exif=patient_exif(6), xmp=XMP,
                   icc_profile=ICC)
    assert PATIENT in data
    assert stored_kind(round_trip(data)) is Kind.WEBP_STRIPPED


def test_palette_gif_is_re_encoded_losslessly() -> None:
    data = encoded(photo("chelsea").quantize(256), "GIF", comment=b"patient note DOE^JANE")
    assert stored_kind(round_trip(data)) is Kind.WEBP_LOSSLESS


def test_bmp_is_stored_much_smaller_than_the_upload() -> None:
    data = encoded(photo("chelsea"), "BMP")
    blob = round_trip(data, max_ratio=0.5)
    assert stored_kind(blob) is Kind.WEBP_LOSSLESS
    print(f"\nBMP {photo('chelsea').size}: upload {len(data)} B, blob {len(blob)} B")


def test_tiff_with_patient_tags_is_re_encoded_losslessly() -> None:
    data = encoded(photo("coffee"), "TIFF", compression="tiff_lzw",
                   tiffinfo={270: "DOE^JANE MRN-0042", 315: "Artist of record"})
    assert PATIENT in data
    assert stored_kind(round_trip(data)) is Kind.WEBP_LOSSLESS


def test_png_without_iend_falls_back_to_a_lossless_re_encode() -> None:
    """A stream the stripper cannot rebuild is still stored, re-encoded from the decode."""
    data = encoded(photo("coffee"), "PNG", pnginfo=patient_png_info())[:-12]
    assert stored_kind(round_trip(data)) is Kind.WEBP_LOSSLESS


def test_a_stripped_stream_that_decodes_differently_is_not_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encode-time verification: a stripped JPEG with other pixels falls back to lossless."""
    strip = stored_image._strip_jpeg

    def altered_quantisation(data: bytes) -> bytes:
        stream = bytearray(strip(data))
        table = stream.index(b"\xff\xdb")
        stream[table + 5] ^= 0x07  # the first quantisation step of the first table
        return bytes(stream)

    monkeypatch.setattr(stored_image, "_strip_jpeg", altered_quantisation)
    assert stored_kind(round_trip(patient_jpeg(photo("chelsea")), max_ratio=10)) is Kind.WEBP_LOSSLESS


# --- corrupt blobs ----------------------------------------------------------------------------


def _corruptions(blob: bytes) -> dict[str, bytes]:
    middle = len(blob) // 2
    return {
        "empty": b"",
        "junk": b"not a stored image at all" * 4,
        "bad magic": b"XXXX" + blob[4:],
        "bad version": blob[:4] + b"\x09" + blob[5:],
        "unknown kind": blob[:5] + b"\x63" + blob[6:],
        "bad transpose": blob[:6] + b"\x40" + blob[7:],
        "wrong width": blob[:7] + (123).to_bytes(4, "big") + blob[11:],
        "truncated": blob[:middle],
        "flipped pixel byte": blob[:middle] + bytes([blob[middle] ^ 0x55]) + blob[middle + 1:],
        "header only": blob[:HEADER_SIZE],
    }


def test_corrupt_blobs_raise_stored_image_error() -> None:
    data = patient_jpeg(photo("coffee"))
    decoded = decode(data)
    blob = encode_for_storage(data, decoded.image, decoded.format)
    for name, bad in _corruptions(blob).items():
        with pytest.raises(StoredImageError):
            decode_stored(bad)
        assert issubclass(StoredImageError, ValueError), name


def test_encode_refuses_a_non_rgb_decode() -> None:
    data = encoded(photo("coffee").convert("L"), "PNG")
    with pytest.raises(ValueError):
        encode_for_storage(data, Image.open(io.BytesIO(data)), "PNG")


@pytest.mark.parametrize("size", [(640, 480), (4000, 3000)])
def test_jpeg_sizes(size: tuple[int, int]) -> None:
    """A 640 x 480 and a 12-megapixel JPEG are stored at most 1.2x their upload, pixels identical
    (bench.job_memory measures the bytes in Redis and the former storage beside them)."""
    data = patient_jpeg(photo("chelsea", size))
    decoded = decode(data)
    blob = encode_for_storage(data, decoded.image, decoded.format)
    back = decode_stored(blob)
    assert np.array_equal(np.asarray(back), np.asarray(decoded.image))
    assert stored_kind(blob) is Kind.JPEG_STRIPPED
    assert len(blob) <= 1.2 * len(data)
    assert not [secret for secret in SECRETS if secret in blob]
    assert set(container_parts(blob)) <= ALLOWED_PARTS
