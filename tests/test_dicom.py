"""Hospital intake: DICOM files (pydicom's bundled ones and files made here), high-bit-depth
greyscale PNG, the windowing reported, and no patient data in any answer, in Redis or in a log.

The intake tests run in process (app.intake); the trust test runs a real stack (Redis, a worker,
the API) and sends a DICOM whose header names a patient through predict, explain, a job and a
study, then scans every Redis key and both processes' logs for the name and the id."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from app.intake import ImageRejected, decode_image  # noqa: E402
from app.windowing import parse_window  # noqa: E402
from tests.queue_support import Stack, png_of, running_stack, wait_for  # noqa: E402

LIMIT = 50_000_000
PATIENT_NAME, PATIENT_ID = "Doe^Janet^Quincy", "PID-7788-9911"
BUNDLED = Path(pydicom.__file__).parent / "data" / "test_files"  # in the wheel: never get_testdata_file (it downloads)


def bundled(name: str) -> bytes:
    return (BUNDLED / name).read_bytes()


def make_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements: object) -> bytes:
    """A Secondary Capture file of ``pixels`` (frames x rows x cols, or rows x cols), uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.InstitutionName = "19700101", "Saint Nowhere Hospital"
    frames = pixels[None] if pixels.ndim == 2 else pixels
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ramp(rows: int = 64, cols: int = 96, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, cols), (rows, 1)).round().astype(np.uint16)


def grey(decoded) -> np.ndarray:
    array = np.asarray(decoded.image)
    assert array.ndim == 3 and (array[..., 0] == array[..., 1]).all()
    return array[..., 0].astype(int)


# ----- pydicom's bundled files ---------------------------------------------------------------------
@pytest.mark.parametrize("name, syntax, source", [
    ("CT_small.dcm", "Explicit VR Little Endian", "data_range"),
    ("MR_small.dcm", "Explicit VR Little Endian", "file_window"),
    ("MR_small_RLE.dcm", "RLE Lossless", "file_window"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless", "file_window"),
    ("JPGExtended.dcm", "JPEG Extended", "data_range"),
    ("JPEG2000.dcm", "JPEG 2000", "data_range"),
])
def test_bundled_files_decode_with_their_windowing(name: str, syntax: str, source: str) -> None:
    decoded = decode_image(bundled(name), LIMIT)
    assert decoded.format == "DICOM" and decoded.windowing.source == source
    assert decoded.dicom["transfer_syntax"].startswith(syntax)
    levels = grey(decoded)
    assert levels.max() >= 200 and levels.std() > 10  # a picture, not a black or flat frame
    assert set(decoded.dicom) == {"rows", "columns", "frames", "frame", "modality", "bits_stored",
                                  "photometric_interpretation", "transfer_syntax"}


def test_compressed_files_decode_to_the_uncompressed_pixels() -> None:
    plain = grey(decode_image(bundled("MR_small.dcm"), LIMIT))
    for name in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):  # lossless: the same image exactly
        assert np.array_equal(grey(decode_image(bundled(name), LIMIT)), plain), name


def test_ct_rescale_gives_hounsfield_units_and_a_requested_window_applies() -> None:
    ds = pydicom.dcmread(BUNDLED / "CT_small.dcm")
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    decoded = decode_image(bundled("CT_small.dcm"), LIMIT, parse_window("40,400"))  # soft tissue
    assert decoded.windowing.as_json() == {"source": "request", "center": 40.0, "width": 400.0,
                                           "function": "LINEAR", "inverted": False}
    levels = grey(decoded)
    assert (levels[hu <= 40 - 0.5 - 399 / 2] == 0).all() and (levels[hu > 40 - 0.5 + 399 / 2] == 255).all()
    inside = (hu > -150) & (hu < 230)
    expected = np.clip(((hu - 39.5) / 399 + 0.5) * 255 + 0.5, 0, 255).astype(int)
    assert np.abs(levels[inside] - expected[inside]).max() <= 1
    auto = decode_image(bundled("CT_small.dcm"), LIMIT, parse_window("auto")).windowing
    assert auto.source == "auto" and auto.width < decode_image(bundled("CT_small.dcm"), LIMIT).windowing.width


# ----- files made here -----------------------------------------------------------------------------
def test_monochrome1_is_inverted() -> None:
    values = ramp()
    normal = grey(decode_image(make_dicom(values), LIMIT))
    inverted = decode_image(make_dicom(values, "MONOCHROME1"), LIMIT)
    assert inverted.windowing.inverted and inverted.dicom["photometric_interpretation"] == "MONOCHROME1"
    assert np.array_equal(grey(inverted), 255 - normal)
    assert normal[:, 0].max() == 0 and normal[:, -1].min() == 255  # low values dark in MONOCHROME2


def test_multi_frame_takes_a_frame_and_refuses_one_it_lacks() -> None:
    frames = np.stack([np.full((32, 48), value, np.uint16) for value in (0, 1000, 4095)])
    frames[:, 0, 0] = 0  # every frame spans the same range, so the window is the data's for each
    frames[:, 0, 1] = 4095
    data = make_dicom(frames)
    assert decode_image(data, LIMIT).dicom == {**decode_image(data, LIMIT).dicom, "frames": 3, "frame": 0}
    levels = [int(np.median(grey(decode_image(data, LIMIT, frame=index)))) for index in range(3)]
    assert levels == [0, 62, 255]
    with pytest.raises(ImageRejected) as refused:
        decode_image(data, LIMIT, frame=3)
    assert (refused.value.status, refused.value.code) == (422, "invalid_parameter")
    assert "[0, 2]" in refused.value.message


def test_a_voi_lut_in_the_file_is_applied() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16).tobytes()  # a gamma curve
    lut["LUTData"].VR = "OW"
    data = make_dicom(ramp(), VOILUTSequence=[lut], WindowCenter=2048, WindowWidth=100)
    decoded = decode_image(data, LIMIT)
    assert decoded.windowing.source == "file_voi_lut" and decoded.windowing.function == "LUT"
    levels = grey(decoded)
    column = ramp()[0]
    expected = np.round(np.sqrt(column / 4095) * 255).astype(int)
    assert np.abs(levels[0] - expected).max() <= 1  # the LUT's curve, not the narrow window
    assert decode_image(data, LIMIT, parse_window("2048,100")).windowing.source == "request"


def test_twelve_bit_range_in_sixteen_bit_png_is_visible_and_predicts_like_its_8_bit_rendering(
        default_model, chelsea: Image.Image) -> None:
    from explainers.pipeline import explain_image

    photo = np.asarray(chelsea.convert("L"), dtype=np.float64)
    twelve = np.round(photo / 255 * 4095).astype(np.uint16)  # a 12-bit radiograph's range in 16 bits
    wide = io.BytesIO()
    Image.fromarray(twelve).save(wide, format="PNG")
    decoded = decode_image(wide.getvalue(), LIMIT)
    assert decoded.original_mode.startswith("I;16") and decoded.windowing.source == "data_range"
    assert grey(decoded).max() >= 250  # not 16/255: the values' own range is shown
    rendering = np.clip(((twelve - float(twelve.min())) / float(twelve.max() - twelve.min())) * 255 + 0.5, 0, 255)
    eight = decode_image(png_of(Image.fromarray(rendering.astype(np.uint8))), LIMIT)
    assert np.abs(grey(decoded) - grey(eight)).max() <= 1
    wide_result = explain_image(default_model, decoded.image, "gradcam", overlay_max_side=256)
    eight_result = explain_image(default_model, eight.image, "gradcam", overlay_max_side=256)
    assert [p.index for p in wide_result.predictions] == [p.index for p in eight_result.predictions]
    assert abs(wide_result.target.score - eight_result.target.score) < 0.02
    overlay = np.asarray(Image.open(io.BytesIO(wide_result.heatmap.overlay_png)))
    assert overlay.mean() > 40  # a visible overlay on a visible image


def test_a_png_sbit_chunk_gives_the_stored_range_and_a_window_is_honoured() -> None:
    values = ramp(top=1000)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    raw = buffer.getvalue()
    import struct
    import zlib

    sbit = struct.pack(">I", 1) + b"sBIT" + bytes([12]) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([12])))
    with_sbit = raw[:33] + sbit + raw[33:]  # after IHDR
    decoded = decode_image(with_sbit, LIMIT)
    assert decoded.windowing.source == "stored_bits" and decoded.windowing.width == 4096
    assert 60 <= grey(decoded).max() <= 64  # 1000 of 4095
    windowed = decode_image(raw, LIMIT, parse_window("500,200"))
    assert windowed.windowing.source == "request" and grey(windowed)[0, 0] == 0 and grey(windowed)[0, -1] == 255
    with pytest.raises(ImageRejected) as refused:
        decode_image(png_of(Image.new("RGB", (8, 8))), LIMIT, parse_window("auto"))
    assert (refused.value.status, refused.value.code) == (422, "invalid_parameter")


def unsupported_syntax_file() -> bytes:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(BUNDLED / "MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_refusals_name_the_transfer_syntax_and_keep_to_the_limits() -> None:
    with pytest.raises(ImageRejected) as refused:
        decode_image(unsupported_syntax_file(), LIMIT)
    assert (refused.value.status, refused.value.code) == (415, "unsupported_transfer_syntax")
    assert "MPEG2 Main Profile / Main Level" in refused.value.message and "1.2.840.10008.1.2.4.100" in refused.value.message
    with pytest.raises(ImageRejected) as variant:  # JPEG Extended 12-bit that libjpeg and Pillow refuse
        decode_image(bundled("JPEG-lossy.dcm"), LIMIT)
    assert (variant.value.status, variant.value.code) == (415, "unsupported_transfer_syntax")
    assert "JPEG Extended" in variant.value.message
    with pytest.raises(ImageRejected) as too_big:
        decode_image(make_dicom(ramp()), 64 * 96 - 1)
    assert too_big.value.status == 413
    data = make_dicom(ramp())
    for broken, statuses in ((data[:140], (400, 415)), (data[:len(data) // 2], (400,))):  # 415: no pixel data
        with pytest.raises(ImageRejected) as corrupt:
            decode_image(broken, LIMIT)
        assert corrupt.value.status in statuses and PATIENT_NAME not in corrupt.value.message
    with pytest.raises(ImageRejected) as frame:
        decode_image(png_of(Image.new("RGB", (8, 8))), LIMIT, frame=1)
    assert frame.value.status == 422


# ----- no patient data, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(artifacts, tmp_path_factory.mktemp("dicom"), "dicom", workers=1,
                       env={"UNBOX_LOG_LEVEL": "debug"}) as started:
        yield started


def _everything_in_redis(stack: Stack) -> bytes:
    connection = stack.redis()
    parts = []
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key).decode()
        parts.append(key)
        if kind == "string":
            parts.append(connection.get(key) or b"")
        elif kind == "hash":
            parts.extend(value for pair in connection.hgetall(key).items() for value in pair)
        elif kind == "list":
            parts.extend(connection.lrange(key, 0, -1))
        elif kind == "set":
            parts.extend(connection.smembers(key))
        elif kind == "zset":
            parts.extend(connection.zrange(key, 0, -1))
    return b"\n".join(parts)


def test_no_patient_data_in_answers_redis_or_logs(stack: Stack) -> None:
    data = make_dicom(ramp(128, 160), ReferringPhysicianName="Who^Doctor", WindowCenter=2048, WindowWidth=4096)
    secrets = [PATIENT_NAME, PATIENT_ID, "Janet^Quincy", "19700101", "Saint Nowhere Hospital", "Who^Doctor"]
    assert all(secret.encode() in data for secret in secrets)  # the header does carry them
    answers: list[str] = []
    with stack.client() as client:
        files = {"image": ("scan.dcm", data, "application/dicom")}
        for route in ("/v1/predict", "/v1/explain"):
            answer = client.post(route, files=files, data={"model": "tiny"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["intake"]["windowing"]["source"] == "file_window"
            assert answer.json()["intake"]["dicom"]["modality"] == "DX"
            answers.append(answer.text)
        for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm", "JPEG2000.dcm"):
            answer = client.post("/v1/explain", files={"image": (name, bundled(name), "application/dicom")},
                                 data={"model": "tiny", "window": "auto"})
            assert answer.status_code == 200 and answer.json()["intake"]["windowing"]["source"] == "auto", answer.text
        refused = client.post("/v1/predict", files={"image": ("x.dcm", unsupported_syntax_file(), "application/dicom")})
        assert (refused.status_code, refused.json()["error"]["code"]) == (415, "unsupported_transfer_syntax")
        assert "MPEG2" in refused.json()["error"]["message"]
        job = client.post("/v1/jobs", files=files, data={"method": "gradcam", "model": "tiny", "window": "2000,3000"})
        assert job.status_code == 202, job.text
        view = wait_for(client, job.json()["id"], {"succeeded", "failed"})
        assert view["status"] == "succeeded" and view["intake"]["windowing"]["source"] == "request"
        answers += [json.dumps(view), client.get(f"/v1/jobs/{job.json()['id']}?pictures=inline").text]
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr("scan.dcm", data)
        spec = {"models": ["tiny"], "methods": [{"name": "gradcam"}], "analyses": {"faithfulness": {"steps": 2}}}
        study = client.post("/v1/studies", files={"archive": ("s.zip", archive.getvalue(), "application/zip")},
                            data={"spec": json.dumps(spec)})
        assert study.status_code == 202, study.text
        deadline = time.monotonic() + 60
        while (seen := client.get(f"/v1/studies/{study.json()['id']}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        assert seen["progress"]["succeeded"] == 1
        answers += [json.dumps(seen), client.get(f"/v1/studies/{seen['id']}/items.csv").text]
    stored = _everything_in_redis(stack)
    logs = "".join((stack.logs / f"dicom-{part}.log").read_text(errors="replace") for part in ("api", "worker"))
    for secret in secrets:
        for where, text in (("an answer", "\n".join(answers)), ("Redis", stored.decode("latin-1")), ("the logs", logs)):
            assert secret not in text, f"{secret!r} found in {where}"
