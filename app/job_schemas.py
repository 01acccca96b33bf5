"""Schemas of the job API (``/v1/jobs``) and of its webhook: they document the contract in OpenAPI.

The routes answer plain JSON built by ``workers.jobqueue.job_view``; these models describe it
(they are never used to re-serialise an answer). A job's ``result`` is a union discriminated by
``method``: one model per built-in job method. Plug-in methods (``UNBOX_JOB_METHOD_MODULES``)
and the method enums are filled in from the server's registry when the document is built
(``app.openapi``), so the document lists exactly the methods the server accepts.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, RootModel, WithJsonSchema

from app.schemas import HeatmapOut, IntakeOut, PredictionOut
from explainers.registry import names_of

# Filled in by app.openapi with the server's job method names.
JOB_METHOD_MARK = {"x-unbox-fill": "job_methods"}
JobMethodName = Annotated[str, Field(description="a job method of this server (see GET /v1/jobs/methods)",
                                     json_schema_extra=JOB_METHOD_MARK)]

FILE_LINK = {"type": "string", "pattern": r"^/v1/jobs/[A-Za-z0-9_-]{1,64}/files/[A-Za-z0-9_.]{1,128}$",
             "description": "link to the picture stored beside the result (GET it for the bytes)"}
Png = Annotated[str, WithJsonSchema({
    "anyOf": [{"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}, FILE_LINK],
    "description": "base64 PNG inline, or (when larger than UNBOX_JOB_INLINE_PICTURE_MAX_BYTES and "
                   "pictures=links) a link /v1/jobs/{id}/files/{name}"})]
Svg = Annotated[str, WithJsonSchema({
    "anyOf": [{"type": "string", "contentMediaType": "image/svg+xml"}, FILE_LINK],
    "description": "SVG text inline, or a link /v1/jobs/{id}/files/{name} like the PNGs"})]


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


class JobLinks(BaseModel):
    self_: str = Field(alias="self", examples=["/v1/jobs/3f2a..."])
    result_png: str = Field(description="the job's picture once it has succeeded")


class JobError(BaseModel):
    code: str = Field(examples=["canceled", "worker_lost", "timeout", "result_too_large"])
    message: str


class StoredFile(BaseModel):
    href: str = Field(json_schema_extra={"pattern": FILE_LINK["pattern"]})
    media_type: Literal["image/png", "image/svg+xml", "application/octet-stream"]
    bytes: int = Field(ge=0)


class _ResultBase(BaseModel):
    """What every built-in result has; ``files`` lists the pictures moved behind links."""

    model: str
    target: PredictionOut
    predictions: list[PredictionOut]
    params: dict[str, Any] = Field(description="the parameters as used (see GET /v1/jobs/methods)")
    timing_ms: dict[str, float]
    files: dict[str, StoredFile] | None = Field(None, description="pictures stored behind links, by name")


class JobHeatmap(HeatmapOut):
    """``HeatmapOut`` whose pictures may also be links to stored files."""

    png: Png = Field(description="8-bit grayscale PNG of the map at display size")
    overlay_png: Png = Field(description="colour overlay on the image, longer side capped")


class CamJobResult(_ResultBase):
    """A heat-map job (the CAM family, rollout): the same shape as ``POST /v1/explain``'s answer."""

    method: Literal[names_of("heatmap")]  # type: ignore[valid-type]
    layer: str | None
    heatmap: JobHeatmap
    details: dict[str, Any] = Field(description="what ran: precision; for Score-CAM mode, channels, "
                                    "forward_passes, batch_size, runtime")


class IgosMask(BaseModel):
    size: list[int] = Field(min_length=2, max_length=2)
    grid: list[list[float]] = Field(description="optimised mask in [0, 1]; low = salient")
    meaning: str


class Curves(BaseModel):
    fraction: list[float]
    deletion: list[float]
    insertion: list[float]


class Faithfulness(BaseModel):
    deletion_auc: float = Field(description="lower is better")
    insertion_auc: float = Field(description="higher is better")
    protocol: dict[str, Any] = Field(description="steps, baseline, resolution, unit, score, order, auc, change")
    curves: Curves | None = None


class IgosJobResult(_ResultBase):
    """An I-GOS / I-GOS++ job: mask, heat map, deletion/insertion scores."""

    method: Literal[names_of("mask")]  # type: ignore[valid-type]
    heatmap: JobHeatmap
    mask: IgosMask
    metrics: Faithfulness
    precision: str
    forward_runtime: str
    images_evaluated: dict[str, int]


class SagRoot(BaseModel):
    patches: list[int]
    score: float
    relative: float = Field(description="score / the full image's score")
    selected: bool
    png: Png | None = Field(None, description="the root's patches over the image")


class SagNode(BaseModel):
    id: int
    patches: list[int]
    score: float
    relative: float
    level: int
    root: bool
    expanded: bool


class SagEdge(BaseModel):
    source: int
    target: int
    removed: int = Field(description="the patch removed along the edge")
    drop: float


class PatchEdges(BaseModel):
    x: list[int]
    y: list[int]


class SagRegion(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="left, top, right, bottom of the part of the "
                             "uploaded image the model saw, in image pixels")
    input: list[int] = Field(min_length=2, max_length=2, description="the model input's height and width, in which "
                             "patch_edges are given")


class SagJobResult(_ResultBase):
    """A Structured Attention Graph job: roots, graph, drawings."""

    method: Literal[names_of("graph")]  # type: ignore[valid-type]
    full_score: float
    threshold: float
    graph_threshold: float
    grid: int
    patch_edges: PatchEdges
    ordering: str
    patch_order: list[int]
    baseline: str
    precision: str
    search_steps: int
    roots: list[SagRoot]
    nodes: list[SagNode]
    edges: list[SagEdge]
    truncated: bool
    forward_passes: dict[str, int]
    incremental: dict[str, Any] | None
    runtime: str
    region: SagRegion | None = Field(None, description="where the patches lie on the upload (to draw a node large)")
    svg: Svg = Field(description="the graph drawn as the SAG paper does: one panel per graph root, the largest "
                     "drops level by level (graph_children, graph_levels), the rest folded into '+ N more'")
    picture_png: Png = Field(description="the graph's roots over the image (served as result.png)")


class JobResult(RootModel[Annotated[Union[CamJobResult, IgosJobResult, SagJobResult],
                                    Field(discriminator="method")]]):
    """A succeeded job's result, by ``method`` (plug-in methods: ``PluginJobResult``)."""


class JobSummary(BaseModel):
    """A job's view without its result (``DELETE``, ``GET /v1/jobs``, webhooks)."""

    id: str
    status: JobStatus
    method: JobMethodName
    model: str
    target: int | None = Field(description="the class asked for; null: the top-1 class")
    progress: float = Field(ge=0, le=1)
    stage: str
    attempts: int = Field(ge=0)
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None = Field(json_schema_extra={"format": "date-time"})
    ended_at: str | None = Field(json_schema_extra={"format": "date-time"})
    queue_position: int | None = Field(None, ge=0, description="while queued: jobs ahead of it")
    params: dict[str, Any] | None = Field(None, description="the parameters the job runs with: the method's "
                                          "defaults and preset, overridden by those the request set")
    intake: IntakeOut | None = Field(None, description="for a DICOM or high-bit-depth upload: how it became the "
                                     "8-bit image the job explains (windowing, the file's technical facts)")
    cancel_requested: bool = Field(False, description="DELETE of a running job: it stops at its next step")
    error: JobError | None = Field(None, description="when failed or canceled")
    links: JobLinks


class JobView(JobSummary):
    """``GET /v1/jobs/{id}``: the job and, once it has succeeded, its result."""

    result: JobResult | None = Field(None, description="when succeeded")


class JobSubmitted(BaseModel):
    """The 202 answer of ``POST /v1/jobs`` (an idempotent replay shows the job's status now)."""

    id: str
    status: JobStatus
    method: JobMethodName
    model: str
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    links: JobLinks


class JobListResponse(BaseModel):
    """``GET /v1/jobs``: the caller's jobs, newest first, one page."""

    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class JobMethodOut(BaseModel):
    name: JobMethodName
    description: str
    timeout_s: int
    params: dict[str, Any] = Field(description="JSON schema of the method's params")


class JobMethodsResponse(BaseModel):
    methods: list[JobMethodOut]


class JobEvent(BaseModel):
    """The body of a job-end webhook (``workers.webhooks.event_for``)."""

    type: Literal["job.succeeded", "job.failed", "job.canceled"]
    timestamp: str = Field(json_schema_extra={"format": "date-time"})
    data: JobSummary
