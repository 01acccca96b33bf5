"""What a study asks for (``POST /v1/studies``'s ``spec``): models, methods and analyses.

The one schema of a study, shared by the API (which validates it once, with each method's own
job parameters) and the workers (which read the options an item's result depends on). Every
analysis is optional; the defaults are the ones ``docs/studies.md`` explains, and where the
CVPR 2024 study (Jiang, Khorram, Li) does not state a value the choice is ours and says so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAP_KINDS = ("heatmap", "mask")  # result kinds whose item is a saliency map (SAG's is a graph)
STUDY_ITEM_VERSION = 1  # part of every cache key: a change of what an item computes invalidates the cache


class StudyMethod(BaseModel):
    """One method of the study and its job parameters (``GET /v1/jobs/methods`` has their schema)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


class FaithfulnessOptions(BaseModel):
    """Deletion and insertion AUCs of every map, aggregated per (model, method)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(50, ge=2, le=200, description="steps of the deletion / insertion curves")
    bootstrap: int = Field(1000, ge=100, le=20000, description="bootstrap resamples for the 95 % interval")


class SubexplanationOptions(BaseModel):
    """Sub-explanation counting over SAG's minimal sufficient explanations (MSEs)."""

    model_config = ConfigDict(extra="forbid")

    thresholds: list[float] = Field(
        default_factory=lambda: [0.5, 0.6, 0.7, 0.8], min_length=1, max_length=8,
        description="shares of the full-image probability at which a subset of an MSE still counts "
                    "(our choice: the paper's exact thresholds are not restated here)")
    max_nodes: int = Field(400, ge=10, le=4000, description="bound on the subsets scored per image")

    @field_validator("thresholds")
    @classmethod
    def _sorted_shares(cls, value: list[float]) -> list[float]:
        if any(not 0 < t < 1 for t in value):
            raise ValueError("thresholds are shares of the full-image probability, strictly between 0 and 1")
        return sorted(set(round(t, 4) for t in value))


class CrosstestOptions(BaseModel):
    """Regions of model A's maps shown alone to model B."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, description="the study method whose maps give the regions (default: the "
                               "first map method of the study, I-GOS++ or Score-CAM in the paper)")
    budgets: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2], min_length=1, max_length=8,
                                 description="shares of the image area kept (the most salient pixels)")
    fill: Literal["blur", "black"] = Field("blur", description="what the pixels outside the region show")

    @field_validator("budgets")
    @classmethod
    def _sorted_budgets(cls, value: list[float]) -> list[float]:
        if any(not 0 < b <= 1 for b in value):
            raise ValueError("budgets are shares of the image area in (0, 1]")
        return sorted(set(round(b, 4) for b in value))


class RegionsOptions(BaseModel):
    """The shortcut finder: saliency inside the manifest's regions."""

    model_config = ConfigDict(extra="forbid")

    gallery: int = Field(12, ge=1, le=200, description="how many of the most suspicious items the summary ranks")


class AgreementOptions(BaseModel):
    """Rank correlation between the maps of different methods on the same image and model."""

    model_config = ConfigDict(extra="forbid")

    grid: int = Field(14, ge=2, le=64, description="both maps are resampled to grid x grid before ranking")


class Analyses(BaseModel):
    model_config = ConfigDict(extra="forbid")

    faithfulness: FaithfulnessOptions | None = None
    subexplanations: SubexplanationOptions | None = None
    crosstest: CrosstestOptions | None = None
    regions: RegionsOptions | None = None
    agreement: AgreementOptions | None = None


class StudySpec(BaseModel):
    """A study: every (image, model, method) is one item; the analyses aggregate the items."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200, description="a label for people (shown in the dashboard)")
    window: str | None = Field(None, max_length=64, description="greyscale window for every image, 'C,W' or 'auto' "
                               "(as /v1/predict's window); default each DICOM file's own, else the stored range")
    models: list[str] = Field(min_length=1, max_length=8)
    methods: list[StudyMethod] = Field(min_length=1, max_length=8)
    analyses: Analyses = Field(default_factory=Analyses)

    @model_validator(mode="after")
    def _distinct(self) -> "StudySpec":
        if len(set(self.models)) != len(self.models):
            raise ValueError("models must be distinct")
        names = [method.name for method in self.methods]
        if len(set(names)) != len(names):
            raise ValueError("methods must be distinct (one entry per method name)")
        return self

    def method(self, name: str) -> StudyMethod:
        return next(method for method in self.methods if method.name == name)


class StudyItemRef(BaseModel):
    """What a study item's job payload adds to a job: which study and which of its images."""

    model_config = ConfigDict(extra="forbid")

    study: str = Field(pattern=r"^[0-9a-f]{32}$")
    image: int = Field(ge=0)
    label: int | None = Field(None, ge=0, description="the image's true class, from the manifest")
    cache_key: str = Field(pattern=r"^[0-9a-f]{64}$")
