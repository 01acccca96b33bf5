"""Schemas of the study API (``/v1/studies``): they document the contract in OpenAPI.

The routes answer plain JSON built by ``workers.study_store.study_view`` and
``workers.study_analyses.summarise``; these models describe it. The summary's sections are
described in ``docs/studies.md``; each appears only when the spec asked for its analysis.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

StudyStatus = Literal["running", "canceling", "succeeded", "canceled"]
STUDY_ID = {"pattern": r"^[0-9a-f]{32}$", "examples": ["9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d"]}


class StudyProgress(BaseModel):
    done: int = Field(ge=0, description="items that ended (succeeded, failed or canceled)")
    total: int = Field(ge=0, description="items: images (manifest rows) x models x methods")
    fraction: float = Field(ge=0, le=1)
    succeeded: int = Field(ge=0)
    failed: int = Field(ge=0, description="items that failed (an unreadable image fails its items, not the study)")
    canceled: int = Field(ge=0)
    cached: int = Field(ge=0, description="items answered from the results of earlier studies")


class StudyLinks(BaseModel):
    self_: str = Field(alias="self")
    items_csv: str = Field(description="one row per (image, model, method)")
    page: str = Field(description="the study's page in the dashboard")


class StudySummaryOut(BaseModel):
    """The aggregated analyses (docs/studies.md); only the sections the spec asked for."""

    model_config = {"extra": "allow"}

    items: dict[str, int]
    faithfulness: dict[str, Any] | None = None
    subexplanations: dict[str, Any] | None = None
    crosstest: dict[str, Any] | None = None
    regions: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None


class StudySummary(BaseModel):
    id: str = Field(json_schema_extra=STUDY_ID)
    name: str | None
    status: StudyStatus
    progress: StudyProgress
    images: int = Field(ge=0, description="distinct images stored for the study (each once)")
    created_at: str
    ended_at: str | None
    links: StudyLinks


class StudyView(StudySummary):
    spec: dict[str, Any] = Field(description="the study's spec as accepted (methods' params as given)")
    summary: StudySummaryOut | None = Field(description="the analyses, once every item has ended")


class StudyListResponse(BaseModel):
    studies: list[StudySummary]
