"""The typed contracts between the workers and the API: what a worker writes into a job's ``progress`` and
``result`` JSON columns, and what the API reads back from them.

The worker builds these models and writes ``model.model_dump(mode="json")`` (never a hand-built dict); the API
reads a column with ``JobProgress.model_validate`` / ``JobResult.model_validate``. Both sides import this module,
which imports neither of them (nor the engine).

Rows written before these models existed still validate: a result blob of the old shape, with a flat
``destination`` string (``"hf://<repo_id>"`` or a local directory) beside ``revision`` and ``commit``, is read as
the typed :data:`Destination` it names (:meth:`JobResult._accept_old_shape`); old progress blobs carry the same
keys as today (``total_steps`` alone is read as ``total``). Unknown keys are ignored, so a newer worker's extra
fields do not break an older API.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

__all__ = [
    "HUB_PREFIX",
    "Destination",
    "FileInfo",
    "HubDestination",
    "JobProgress",
    "JobResult",
    "LocalDestination",
    "Metrics",
    "Stage",
]

#: How a Hub destination was spelled in the old result shape, and still is in the HTTP API's ``destination``.
HUB_PREFIX = "hf://"


class Stage(StrEnum):
    """The stage a job is in: the engine's stages (``divmerge_core.progress.ProgressEvent``), the worker's own
    (``starting``, ``upload``, ``upload_wait``) and the API's ``queued`` (a job waiting for a worker)."""

    QUEUED = "queued"
    STARTING = "starting"
    RESOLVE = "resolve"
    VALIDATE = "validate"
    EVAL_DATA = "eval_data"
    DATA = "data"
    TEACHER = "teacher"
    OPTIMISE = "optimise"
    WRITE = "write"
    COMPARE = "compare"
    EVALUATE = "evaluate"
    UPLOAD = "upload"
    UPLOAD_WAIT = "upload_wait"
    DONE = "done"


class _Contract(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class JobProgress(_Contract):
    """The ``progress`` column: written at every stage change and otherwise at most every
    ``progress_interval_s`` (``divmerge_worker.runner.ProgressWriter``)."""

    stage: Stage
    step: int = 0
    total: int = 0
    loss: float | None = Field(None, description="the last training loss (optimise)")
    eta_s: float | None = Field(
        None, description="seconds left in this stage at its step rate; None: unknown"
    )
    updated_at: datetime | None = None
    heldout: list[list[float | None]] | None = Field(
        None, description="learned methods: held-out rows so far, [epoch, step, mean, per-task ...]"
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_steps(self) -> int:
        """Same as ``total`` (older clients read this name)."""
        return self.total

    @model_validator(mode="before")
    @classmethod
    def _total_from_total_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("total") is None and data.get("total_steps") is not None:
            data = {**data, "total": data["total_steps"]}
        return data


class HubDestination(_Contract):
    """Uploaded to a Hub repo (``upload_folder``)."""

    kind: Literal["hub"] = "hub"
    repo_id: str = Field(min_length=1)
    revision: str | None = Field(None, description="the branch uploaded to")
    commit: str | None = Field(None, description="the upload's commit oid")

    @property
    def uri(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}"


class LocalDestination(_Contract):
    """Renamed into an allow-listed local directory."""

    kind: Literal["local"] = "local"
    path: str = Field(min_length=1)

    @property
    def uri(self) -> str:
        return self.path


#: Where a merge was delivered (``divmerge_worker.upload``), told apart by ``kind``.
Destination = Annotated[HubDestination | LocalDestination, Field(discriminator="kind")]


class FileInfo(_Contract):
    """One output file (what ``GET /v1/merges/{id}/files`` lists)."""

    name: str
    size: int
    sha256: str


class Metrics(_Contract):
    """The engine's ``MergeResult.metrics``; keys it adds later are kept (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    device: str | None = None
    tensors: int | None = None
    final_loss: float | None = None
    steps: int | None = None
    placement: str | None = None
    evaluate_s: float | None = None


class JobResult(_Contract):
    """The ``result`` column. Written when the merge is done: with ``destination`` once delivered (the job
    succeeded), without it while the merged folder is kept because its delivery failed (``POST /retry``)."""

    destination: Destination | None = None
    files: list[str] = []
    file_info: list[FileInfo] = []
    coefficients: dict[str, Any] | None = Field(
        None, description="learned methods: coefficients.json without group_of and losses"
    )
    metrics: Metrics = Metrics()
    evaluation: dict[str, Any] | None = Field(
        None, description="evaluation.json, when the models carry eval sets"
    )
    resolved: dict[str, str | None] | None = Field(
        None,
        description="the references' commit SHAs (datasets included) while the result is kept; moved to the "
        "job's resolved column on delivery",
    )

    @property
    def hub(self) -> HubDestination | None:
        return self.destination if isinstance(self.destination, HubDestination) else None

    @property
    def local_path(self) -> str | None:
        return self.destination.path if isinstance(self.destination, LocalDestination) else None

    @model_validator(mode="before")
    @classmethod
    def _accept_old_shape(cls, data: Any) -> Any:
        """``{"destination": "hf://org/name", "revision": ..., "commit": ...}`` or ``{"destination": "/dir"}``
        (what workers wrote before this contract) becomes the typed destination it names."""
        if not isinstance(data, dict) or not isinstance(data.get("destination"), str):
            return data
        data = dict(data)
        dest = data.pop("destination")
        revision, commit = data.pop("revision", None), data.pop("commit", None)
        if dest.startswith(HUB_PREFIX):
            data["destination"] = {
                "kind": "hub",
                "repo_id": dest[len(HUB_PREFIX) :],
                "revision": revision,
                "commit": commit,
            }
        else:
            data["destination"] = {"kind": "local", "path": dest}
        return data
