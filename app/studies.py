"""The study API (``/v1/studies``): explain models over a dataset, fanned out on the queue.

Submission validates everything once: the spec (models, methods and their job params, the
analyses and what each needs), the archive (``app.study_archive``: hostile ones are a 4xx) and
every image (an unreadable one fails its items, not the study). Each distinct image is stored
once; each (manifest row, model, method) is one item: answered from the owner's cache of
earlier results when it can be, else queued as a job on the study queue
(``workers.study_store``). The summary is computed once every item has ended, from the items,
and kept; ``items.csv`` is the same rows the summary was computed from.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import ValidationError

from app.auth import Principal, caller_of, require
from app.errors import ApiError
from app.intake import ImageRejected, decode_image
from app.windowing import WindowRefused, WindowRequest, parse_window
from app.json_input import parse_json_object
from app.jobs import JobsClient
from app.schemas import JSON_OBJECT_TEXT, RETRY_AFTER, error_responses, header
from app.study_archive import ArchiveLimits, ArchiveRejected, ManifestRow, read_archive
from app.study_schemas import STUDY_ID, StudyListResponse, StudyView
from core.validation import describe_validation_errors
from explainers.registry import METHODS
from explainers.render import blend, encode_png, fit_within, to_uint8
from models.preprocess import Geometry, Preprocessor
from workers.jobqueue import TERMINAL
from workers.methods import method_timeout
from workers.payload import JobPayload
from workers.stored_image import decode_stored, encode_for_storage
from workers.study_analyses import item_rows, items_csv, summarise
from workers.study_item import crosstest_method, item_options
from workers.study_spec import MAP_KINDS, StudyItemRef, StudySpec
from workers.study_store import NewItem, StudyStore, item_cache_key, study_view

logger = logging.getLogger("unbox.studies")

_STUDY_ID = re.compile(STUDY_ID["pattern"])
POLL_AFTER_S = "2"
OVERLAY_SIDE = 512


def _not_found(study_id: str) -> ApiError:
    return ApiError(404, "study_not_found", f"no study {study_id!r}: it never existed or it has expired")


def _invalid_spec(message: str) -> ApiError:
    return ApiError(422, "invalid_spec", message)


def _links(study_id: str) -> dict[str, str]:
    return {"self": f"/v1/studies/{study_id}", "items_csv": f"/v1/studies/{study_id}/items.csv",
            "page": f"/dashboard/studies/{study_id}"}


class StudiesClient:
    """The API's side of studies; shares the job client's Redis connection and error mapping."""

    def __init__(self, jobs: JobsClient) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.service = jobs.service
        self.store = StudyStore(jobs.redis, jobs.settings.queue_name) if jobs.redis is not None else None

    def _studies(self) -> StudyStore:
        self.jobs._store()  # 503 queue_not_configured without a Redis
        assert self.store is not None
        return self.store

    # ----- validation -----------------------------------------------------------------------
    def parse_spec(self, text: str | None) -> StudySpec:
        """The spec, validated with each method's own job parameters and each analysis's needs."""
        raw = parse_json_object(text, field="spec", max_bytes=self.settings.max_json_bytes,
                                max_depth=self.settings.max_json_depth)
        try:
            spec = StudySpec.model_validate(raw)
        except ValidationError as exc:
            raise _invalid_spec(f"invalid spec: {describe_validation_errors(exc.errors(), 'spec')}") from None
        known = self.service.registry.specs
        unknown = [name for name in spec.models if name not in known]
        if unknown:
            raise ApiError(422, "unknown_model", f"unknown models {unknown}; available: {', '.join(sorted(known))}")
        methods = []
        for entry in spec.methods:
            if entry.name not in METHODS:
                raise ApiError(422, "unknown_method", f"unknown study method {entry.name!r}; studies run the "
                               f"registered explainers: {', '.join(sorted(METHODS))}")
            job = self.jobs._method(entry.name)
            try:
                params = job.params.model_validate(entry.params).model_dump(mode="json", exclude_unset=True)
            except ValidationError as exc:
                raise _invalid_spec(f"invalid params for {entry.name}: "
                                    f"{describe_validation_errors(exc.errors(), 'params')}") from None
            methods.append({"name": entry.name, "params": params})
        spec = spec.model_copy(update={"methods": [type(spec.methods[0])(**m) for m in methods]})
        self._check_analyses(spec)
        return spec

    @staticmethod
    def _check_analyses(spec: StudySpec) -> None:
        analyses = spec.analyses
        map_methods = [m.name for m in spec.methods if METHODS[m.name].result_kind in MAP_KINDS]
        graphs = [m.name for m in spec.methods if METHODS[m.name].result_kind == "graph"]
        for name, needs_map in (("faithfulness", analyses.faithfulness), ("regions", analyses.regions)):
            if needs_map is not None and not map_methods:
                raise _invalid_spec(f"analysis {name} needs a method that makes a heat map (e.g. gradcam, igos++)")
        if analyses.agreement is not None and len(map_methods) < 2:
            raise _invalid_spec("analysis agreement compares the maps of two or more heat-map methods")
        if analyses.subexplanations is not None and not graphs:
            raise _invalid_spec("analysis subexplanations counts SAG's minimal sufficient explanations: add "
                                "method sag")
        if analyses.crosstest is not None:
            if len(spec.models) < 2:
                raise _invalid_spec("analysis crosstest shows one model's regions to another: name two or more models")
            source = crosstest_method(spec)
            if source not in map_methods:
                raise _invalid_spec(f"crosstest.method must be one of the study's heat-map methods {map_methods}")

    def _limits(self) -> ArchiveLimits:
        s = self.settings
        return ArchiveLimits(max_files=s.study_max_files, max_member_bytes=s.max_upload_bytes,
                             max_total_bytes=s.study_max_unpacked_bytes)

    def _check_rows(self, rows: list[ManifestRow], spec: StudySpec) -> None:
        for model in spec.models:
            classes = self.jobs._num_classes(model)
            for row in rows:
                for what, value in (("target", row.target), ("label", row.label)):
                    if value is not None and value >= classes:
                        raise ApiError(422, "invalid_manifest", f"manifest.csv line {row.line}: {what} {value} is "
                                       f"not a class of model {model} (0 to {classes - 1})")

    # ----- operations -----------------------------------------------------------------------
    def submit(self, caller: Principal, data: bytes, spec_text: str | None) -> dict[str, Any]:
        """Validate, store and fan out a study of ``caller``; its view."""
        spec = self.parse_spec(spec_text)
        store = self._studies()
        try:
            archive = read_archive(data, self._limits())
        except ArchiveRejected as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        rows = archive.rows
        self._check_rows(rows, spec)
        total = len(rows) * len(spec.models) * len(spec.methods)
        if total > self.settings.study_max_items:
            raise ApiError(422, "study_too_large", f"the study has {total} items (images x models x methods); at "
                           f"most {self.settings.study_max_items} are allowed (UNBOX_STUDY_MAX_ITEMS)")
        try:
            window = parse_window(spec.window)
        except WindowRefused as exc:
            raise _invalid_spec(f"invalid spec: window: {exc.message}") from None
        images = self._intake(archive.files, rows, window)
        masks, regions = self._regions(archive.files, rows, images)
        study_id = uuid.uuid4().hex
        with self.jobs._reachable():
            items = self._items(store, caller, study_id, spec, rows, images)
            manifest = [{"line": row.line, "path": row.path, "target": row.target, "label": row.label,
                         "region": regions[r], "image": images[row.path].index, "size": images[row.path].size,
                         "intake": images[row.path].intake}
                        for r, row in enumerate(rows)]
            record = {"name": spec.name or "", "spec": spec.model_dump_json(), "manifest": json.dumps(manifest)}
            blobs = [image.blob for image in sorted(images.values(), key=lambda image: image.index)
                     if image.blob is not None]
            self._check_quota(store, caller)
            runnable = sum(item.payload is not None for item in items)
            if runnable and store.queued_items() + runnable > self.settings.study_max_queued_items:
                raise ApiError(503, "queue_full", f"the study queue cannot take {runnable} more items "
                               f"(UNBOX_STUDY_MAX_QUEUED_ITEMS={self.settings.study_max_queued_items}); retry later",
                               {"Retry-After": "30"})
            ttl = self.settings.job_image_ttl_s + self.settings.job_result_ttl_s + max(
                (item.timeout_s for item in items), default=0)
            fields = store.create(study_id, caller.owner, record, blobs, masks, items, ttl_s=ttl,
                                  result_ttl_s=self.settings.job_result_ttl_s,
                                  max_active=self.settings.max_active_studies_per_key)
            if fields is None:  # another study of this owner was admitted meanwhile
                raise self._quota_exceeded()
        logger.info("study %s: %d images, %d items (%d cached, %d failed at intake)", study_id, len(blobs), total,
                    int(fields["cached"]), int(fields["n_failed"]))
        return {**study_view(fields), "links": _links(study_id)}

    def _check_quota(self, store: StudyStore, caller: Principal) -> None:
        """At most ``max_active_studies_per_key`` studies of one owner running at once (429 beyond):
        checked before the images are decoded, and again, atomically, when the study is written."""
        limit = self.settings.max_active_studies_per_key
        if limit and store.active(caller.owner) >= limit:
            raise self._quota_exceeded()

    def _quota_exceeded(self) -> ApiError:
        return ApiError(429, "quota_exceeded", f"this client already has {self.settings.max_active_studies_per_key} "
                        "studies running (UNBOX_MAX_ACTIVE_STUDIES_PER_KEY); wait for one to end or cancel it",
                        {"Retry-After": "30"})

    def _intake(self, files: dict[str, bytes], rows: list[ManifestRow], window: WindowRequest) -> dict[str, "_Intake"]:
        """Each distinct image decoded once: its stored blob and pixel digest, or why it is unreadable."""
        images: dict[str, _Intake] = {}
        for row in rows:
            if row.path in images:
                continue
            data = files[row.path]
            try:
                if len(data) > self.settings.max_upload_bytes:
                    raise ImageRejected(413, "upload_too_large", f"the image exceeds {self.settings.max_upload_bytes} "
                                        "bytes")
                decoded = decode_image(data, self.settings.max_image_pixels, window)
            except ImageRejected as exc:
                images[row.path] = _Intake(-1, None, "", None, {"code": exc.code, "message": exc.message})
                continue
            index = sum(image.blob is not None for image in images.values())
            digest = hashlib.sha256(decoded.image.tobytes()).hexdigest()
            images[row.path] = _Intake(index, encode_for_storage(data, decoded.image, decoded.format), digest,
                                       list(decoded.image.size), None,
                                       decoded.intake_json() if decoded.windowing or decoded.dicom else None)
        return images

    def _regions(self, files: dict[str, bytes], rows: list[ManifestRow],
                 images: dict[str, "_Intake"]) -> tuple[dict[int, bytes], list[dict[str, Any] | None]]:
        """Each row's region as stored: a box, or a mask (a PNG at the image's size, stored by row)."""
        masks: dict[int, bytes] = {}
        regions: list[dict[str, Any] | None] = []
        for r, row in enumerate(rows):
            region = row.region
            if region is None:
                regions.append(None)
            elif region.box is not None:
                regions.append({"kind": region.kind, "box": list(region.box)})
            else:
                size = images[row.path].size
                try:
                    mask = decode_image(files[region.mask], self.settings.max_image_pixels).image.convert("L")
                except ImageRejected as exc:
                    raise ApiError(422, "invalid_manifest", f"manifest.csv line {row.line}: the region mask "
                                   f"{region.mask!r} cannot be read ({exc.message})") from None
                if size is not None and tuple(mask.size) != tuple(size):
                    mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
                buffer = io.BytesIO()
                mask.point(lambda value: 255 if value >= 128 else 0).convert("1").save(buffer, format="PNG")
                masks[r] = buffer.getvalue()
                regions.append({"kind": region.kind, "mask": r})
        return masks, regions

    def _items(self, store: StudyStore, caller: Principal, study_id: str, spec: StudySpec, rows: list[ManifestRow],
               images: dict[str, "_Intake"]) -> list[NewItem]:
        """Every item: failed (unreadable image), cached (an earlier result of this owner), or to queue."""
        plans: list[tuple[int, str, str, ManifestRow, str | None]] = []
        for r, row in enumerate(rows):
            for m, model in enumerate(spec.models):
                for q, method in enumerate(spec.methods):
                    index = (r * len(spec.models) + m) * len(spec.methods) + q
                    image = images[row.path]
                    key = None
                    if image.error is None:
                        options = {**item_options(spec, method.name), "target": row.target, "label": row.label}
                        key = item_cache_key(caller.owner, model, image.digest, method.name, method.params, options)
                    plans.append((index, model, method.name, row, key))
        cached = store.cached_results([key for *_, key in plans if key is not None])
        hits = dict(zip([key for *_, key in plans if key is not None], cached))
        items = []
        for index, model, method, row, key in plans:
            job = self.jobs._method(method)
            timeout = method_timeout(job, self.settings.job_timeouts)
            image = images[row.path]
            if key is None:
                items.append(NewItem(index, method, timeout_s=timeout, error=image.error))
            elif hits.get(key) is not None:
                items.append(NewItem(index, method, timeout_s=timeout, result=hits[key]))
            else:
                payload = JobPayload(method=method, model=model, target=row.target, params=spec.method(method).params,
                                     study=StudyItemRef(study=study_id, image=image.index, label=row.label,
                                                        cache_key=key))
                items.append(NewItem(index, method, payload.model_dump(mode="json", exclude_none=True), timeout))
        return items

    def _fields(self, store: StudyStore, study_id: str, owner: str) -> dict[str, str]:
        fields = store.fields(study_id) if _STUDY_ID.match(study_id) else None
        if fields is None or fields.get("owner") != owner:
            raise _not_found(study_id)
        return fields

    def view(self, caller: Principal, study_id: str) -> dict[str, Any]:
        """The study: status, progress, spec, and the summary once every item has ended."""
        store = self._studies()
        with self.jobs._reachable():
            fields = self._fields(store, study_id, caller.owner)
            view = {**study_view(fields), "spec": json.loads(fields["spec"]), "summary": None,
                    "links": _links(study_id)}
            if view["status"] in TERMINAL:
                view["summary"] = (json.loads(fields["summary"]) if fields.get("summary")
                                   else self._outputs(store, study_id, fields)[0])
        return view

    def _outputs(self, store: StudyStore, study_id: str,
                 fields: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The summary and rows of a study's items (kept once the study has ended)."""
        spec = StudySpec.model_validate_json(fields["spec"])
        items = self._item_records(store, study_id, fields, spec)
        rows = item_rows(items, spec)
        summary = summarise(items, spec, rows)
        if fields.get("status") in TERMINAL:
            summary = store.keep_outputs(study_id, summary, rows)
        return summary, rows

    def _item_records(self, store: StudyStore, study_id: str, fields: dict[str, str],
                      spec: StudySpec) -> list[dict[str, Any]]:
        """Every item as the analyses read it: what it is (from the manifest) and how it ended."""
        manifest = json.loads(fields["manifest"])
        records = store.items(study_id, int(fields["total"]))
        masks: dict[int, np.ndarray] = {}
        items = []
        for index, record in enumerate(records):
            r, rest = divmod(index, len(spec.models) * len(spec.methods))
            m, q = divmod(rest, len(spec.methods))
            row = manifest[r]
            region = row["region"]
            if region is not None and "mask" in region:
                if r not in masks:
                    data = store.mask(study_id, r)
                    masks[r] = np.asarray(Image.open(io.BytesIO(data)).convert("L")) >= 128 if data else None
                region = {"kind": region["kind"], "mask": masks[r]} if masks[r] is not None else None
            status = record.get("status", "failed")
            items.append({
                "index": index, "path": row["path"], "model": spec.models[m], "method": spec.methods[q].name,
                "status": status, "label": row["label"], "region": region, "image_size": row["size"] or [0, 0],
                "error": json.loads(record["error"]) if record.get("error") else (
                    None if record else {"code": "expired", "message": "the item's record expired"}),
                "result": json.loads(record["result"]) if status == "succeeded" and record.get("result") else None,
            })
        return items

    def items_csv(self, caller: Principal, study_id: str) -> str:
        """``items.csv``: the kept rows of an ended study, else the rows as they stand."""
        store = self._studies()
        with self.jobs._reachable():
            fields = self._fields(store, study_id, caller.owner)
            if fields.get("rows"):
                return items_csv(json.loads(fields["rows"]))
            return items_csv(self._outputs(store, study_id, fields)[1])

    def listing(self, caller: Principal, limit: int) -> dict[str, Any]:
        store = self._studies()
        with self.jobs._reachable():
            found = store.owned(caller.owner, limit)
        return {"studies": [{**study_view(fields), "links": _links(fields["id"])} for fields in found]}

    def cancel(self, caller: Principal, study_id: str) -> dict[str, Any]:
        """Cancel every queued item and ask running ones to stop; the study's view."""
        store = self._studies()
        if not _STUDY_ID.match(study_id):
            raise _not_found(study_id)
        with self.jobs._reachable():
            answer = store.cancel(study_id, caller.owner, self.settings.job_result_ttl_s)
            if answer == "missing":
                raise _not_found(study_id)
            if answer == "succeeded":
                raise ApiError(409, "study_finished", f"study {study_id} has already finished")
        return self.view(caller, study_id)

    def overlay(self, caller: Principal, study_id: str, index: int) -> bytes:
        """An item's map over its image, drawn from the stored map (the gallery's pictures)."""
        store = self._studies()
        with self.jobs._reachable():
            fields = self._fields(store, study_id, caller.owner)
            if index >= int(fields["total"]):
                raise ApiError(404, "item_not_found", f"study {study_id} has no item {index}")
            spec = StudySpec.model_validate_json(fields["spec"])
            row = json.loads(fields["manifest"])[index // (len(spec.models) * len(spec.methods))]
            record = store.items_at(study_id, index)
            blob = store.image(study_id, row["image"]) if row["image"] >= 0 else None
        result = json.loads(record["result"]) if record.get("status") == "succeeded" and record.get("result") else {}
        if not result.get("map") or blob is None:
            raise ApiError(404, "no_picture", f"item {index} of study {study_id} has no map to draw")
        image = decode_stored(blob)
        grid = torch.tensor(result["map"]["grid"], dtype=torch.float32)
        width, height = fit_within(image.width, image.height, OVERLAY_SIDE)
        geometry = Geometry(image.width, image.height, tuple(result["map"]["box"]))
        levels = to_uint8(Preprocessor.map_to_image(grid, geometry, width, height))
        small = image.resize((width, height), Image.Resampling.BILINEAR)
        return encode_png(blend(np.asarray(small.convert("RGB")), levels))


@dataclass(slots=True)
class _Intake:
    """One distinct image of the archive: its index among the stored images, blob, digest, size
    (or the error that makes its items fail), and its windowing / DICOM facts as reported."""

    index: int
    blob: bytes | None
    digest: str
    size: list[int] | None
    error: dict[str, str] | None
    intake: dict[str, Any] | None = None


# ----- routes -------------------------------------------------------------------------------
router = APIRouter(prefix="/v1/studies", tags=["studies"], dependencies=[Depends(require("jobs"))])
StudyId = Annotated[str, Path(description="the study's id", json_schema_extra=STUDY_ID)]


def _studies(request: Request) -> StudiesClient:
    return request.app.state.studies


@router.post("", status_code=202, response_model=StudyView, responses={
    202: {"description": "accepted: its items are queued (or answered from earlier results)", "headers": {
        "Location": header("the study: /v1/studies/{id}"), **RETRY_AFTER}},
    **error_responses(400, 413, 415, 422, 429, 503)})
async def submit_study(
    request: Request,
    archive: Annotated[UploadFile, File(description="zip or tar (optionally gzip) of images, with an optional "
                                        "manifest.csv: path, target, label, region, region_kind")],
    spec: Annotated[str, Form(description="JSON: models, methods (with params), analyses (docs/studies.md)",
                              json_schema_extra=JSON_OBJECT_TEXT)],
) -> JSONResponse:
    """Explain models over a dataset: one item per (image, model, method), spread over every worker."""
    data = await archive.read()
    view = await run_in_threadpool(_studies(request).submit, caller_of(request), data, spec)
    view = await run_in_threadpool(_studies(request).view, caller_of(request), view["id"])
    return JSONResponse(view, status_code=202, headers={"Location": f"/v1/studies/{view['id']}",
                                                        "Retry-After": POLL_AFTER_S})


@router.get("", response_model=StudyListResponse, responses=error_responses(503))
async def list_studies(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:
    """The caller's studies, newest first."""
    return JSONResponse(await run_in_threadpool(_studies(request).listing, caller_of(request), limit))


@router.get("/{study_id}", response_model=StudyView, responses={
    200: {"headers": {"Retry-After": {**RETRY_AFTER["Retry-After"], "description": "while running"}}},
    **error_responses(404, 503)})
async def get_study(request: Request, study_id: StudyId) -> JSONResponse:
    """Status, progress (items done / total), the spec, and the summary once every item has ended."""
    view = await run_in_threadpool(_studies(request).view, caller_of(request), study_id)
    headers = {} if view["status"] in TERMINAL else {"Retry-After": POLL_AFTER_S}
    return JSONResponse(view, headers=headers)


@router.delete("/{study_id}", response_model=StudyView, responses=error_responses(404, 409, 503))
async def cancel_study(request: Request, study_id: StudyId) -> JSONResponse:
    """Cancel the study's queued items at once and ask its running items to stop."""
    return JSONResponse(await run_in_threadpool(_studies(request).cancel, caller_of(request), study_id))


@router.get("/{study_id}/items.csv", response_class=Response, responses={
    200: {"description": "one row per (image, model, method)", "content": {"text/csv": {"schema": {"type": "string"}}}},
    **error_responses(404, 503)})
async def study_items_csv(request: Request, study_id: StudyId) -> Response:
    """The items as CSV: path, model, method, target, score, deletion_auc, insertion_auc, region_share,
    pointing_hit, then each analysis's columns (empty where not computed)."""
    text = await run_in_threadpool(_studies(request).items_csv, caller_of(request), study_id)
    return Response(text, media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="study-{study_id}-items.csv"'})


@router.get("/{study_id}/items/{index}/overlay.png", response_class=Response, responses={
    200: {"description": "the item's map over its image", "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(404, 503)})
async def study_item_overlay(request: Request, study_id: StudyId,
                             index: Annotated[int, Path(ge=0, le=10_000_000)]) -> Response:
    """An item's heat map drawn over its image (from the stored map; nothing is recomputed)."""
    png = await run_in_threadpool(_studies(request).overlay, caller_of(request), study_id, index)
    return Response(png, media_type="image/png")
