"""Image intake: every hostile or unusual upload gets its documented outcome, never a 500."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from app.intake import ImageRejected, decode_image
from tests.conftest import jpeg_bytes, png_bytes

LIMIT = 50_000_000


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header declares ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def gray16_tiff() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="TIFF")
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 20, 20)).convert("CMYK").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """40 x 20 stored pixels, red left half, with EXIF orientation 6 (display rotated 90 deg clockwise)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def rgba_png() -> bytes:
    image = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    image.paste((0, 128, 0, 255), (10, 0, 20, 10))
    return png_bytes(image)


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    return data[: len(data) // 2]


def bytes_of(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# (name, payload, expected status, expected error code or None)
CORPUS = [
    ("empty", b"", 400, "empty_upload"),
    ("random bytes", np.random.default_rng(1).bytes(4096), 415, "unsupported_format"),
    ("jpeg marker then garbage", b"\xff\xd8\xff\xe0" + np.random.default_rng(2).bytes(2048), 400, "corrupt_image"),
    ("truncated png", truncated_png(), 400, "corrupt_image"),
    ("png declaring 100000 x 100000", png_header_only(100_000, 100_000), 413, "too_many_pixels"),
    ("png declaring 10000 x 6000 (over our limit, under Pillow's)", png_header_only(10_000, 6_000), 413, "too_many_pixels"),
    ("text renamed .jpg", b"this is not an image, just some text\n" * 10, 415, "unsupported_format"),
    ("ICO (a format we do not take)", bytes_of(Image.new("RGB", (16, 16)), "ICO"), 415, "unsupported_format"),
    ("animated gif", animated_gif(), 200, None),
    ("16-bit tiff", gray16_tiff(), 200, None),
    ("cmyk jpeg", cmyk_jpeg(), 200, None),
    ("exif-rotated jpeg", exif_rotated_jpeg(), 200, None),
    ("rgba png", rgba_png(), 200, None),
    ("1 x 1 png", png_bytes(Image.new("RGB", (1, 1), (10, 200, 30))), 200, None),
    ("webp", bytes_of(Image.new("RGB", (24, 24), (40, 90, 200)), "WEBP"), 200, None),
    ("bmp", bytes_of(Image.new("RGB", (24, 24), (40, 90, 200)), "BMP"), 200, None),
]


@pytest.mark.parametrize("name,payload,status,code", CORPUS, ids=[c[0] for c in CORPUS])
def test_decode_outcome(name, payload, status, code):
    if status == 200:
        decoded = decode_image(payload, LIMIT)
        assert decoded.image.mode == "RGB"
    else:
        with pytest.raises(ImageRejected) as caught:
            decode_image(payload, LIMIT)
        assert (caught.value.status, caught.value.code) == (status, code)


def test_animated_gif_uses_first_frame():
    pixel = decode_image(animated_gif(), LIMIT).image.getpixel((8, 8))
    assert pixel[0] > 200 and pixel[2] < 50  # red first frame, not the blue second


def test_16_bit_tiff_is_scaled_not_clipped():
    values = np.asarray(decode_image(gray16_tiff(), LIMIT).image)[0, :, 0]
    assert values[0] == 0 and values[-1] == 255
    assert 100 < values[len(values) // 2] < 155  # mid-grey, where clipping would give 255


def test_cmyk_jpeg_keeps_its_colour():
    r, g, b = decode_image(cmyk_jpeg(), LIMIT).image.getpixel((16, 16))
    assert r > 180 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    image = decode_image(exif_rotated_jpeg(), LIMIT).image
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red half is on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_alpha_is_composited_on_white():
    image = decode_image(rgba_png(), LIMIT).image
    assert image.getpixel((2, 5)) == (255, 255, 255)
    assert image.getpixel((15, 5)) == (0, 128, 0)


@pytest.mark.parametrize("name,payload,status,code", CORPUS, ids=[c[0] for c in CORPUS])
def test_http_status_for_upload(api_server, name, payload, status, code):
    response = httpx.post(api_server + "/v1/predict", files={"image": ("upload.jpg", payload, "image/jpeg")}, timeout=60)
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code
    else:
        assert len(response.json()["predictions"]) == 5


def test_oversize_upload_with_content_length(api_server):
    payload = b"\xff\xd8\xff" + b"\x00" * (9 * 1024 * 1024)
    response = httpx.post(api_server + "/v1/explain", files={"image": ("big.jpg", payload, "image/jpeg")}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"


def test_oversize_chunked_upload_is_cut_off(api_server):
    """Without a Content-Length the body is counted as it streams and refused past the limit."""
    boundary = "unboxboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
               "Content-Type: image/jpeg\r\n\r\n").encode()
        for _ in range(40):
            yield b"\x00" * (256 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(api_server + "/v1/predict", content=body(), timeout=60,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] in ("upload_too_large", "payload_too_large")


def test_missing_image_field_is_422(api_server):
    response = httpx.post(api_server + "/v1/predict", data={"model": "efficientnet_lite0"}, timeout=30)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_parameter"


def test_a_real_photo_still_works_after_the_corpus(api_server, chelsea):
    response = httpx.post(api_server + "/v1/predict", files={"image": ("c.jpg", jpeg_bytes(chelsea), "image/jpeg")}, timeout=60)
    assert response.status_code == 200
