"""The one merge-config schema, shared by the CLI (YAML) and the service (JSON).

It follows mergekit's layout (``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters.weight/density``, ``parameters``, ``dtype``) so mergekit configs for the classic
methods load unchanged, and adds what the learned methods need: per-model unlabelled ``data`` and the
optimisation parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

CLASSIC_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "multislerp")
LEARNED_METHODS = ("divmerge", "adamerging")
METHODS = CLASSIC_METHODS + LEARNED_METHODS
#: Methods built on task vectors: they need a base model.
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "divmerge", "adamerging")

Method = Literal[
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "multislerp", "divmerge", "adamerging"
]
DType = Literal["float32", "bfloat16", "float16"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(@[\w.\-/]+)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DataSpec(_Strict):
    """Unlabelled inputs of one task: a Hub dataset, a local file, or inline texts (exactly one)."""

    dataset: str | None = Field(None, description="Hub dataset id, optionally 'org/name@revision'")
    config: str | None = Field(None, description="dataset configuration (subset) name")
    split: str = "train"
    path: str | None = Field(None, description="local .jsonl/.json/.csv/.tsv/.txt/.parquet file")
    texts: list[str] | None = Field(None, description="inline input texts")
    text_columns: list[str] | None = Field(
        None, description="column(s) holding the input; two columns are encoded as a sentence pair"
    )
    template: str | None = Field(
        None,
        description="format string over the columns, e.g. 'Premise: {premise}\\nHypothesis: {hypothesis}'",
    )
    num_samples: int = Field(200, ge=1, description="how many inputs to use (seeded sample)")
    seed: int = 0
    labels: list[str | int] | None = Field(
        None,
        description="sequence classification with one head shared by several tasks: this task's labels "
        "(names from config.json id2label, or ids); the teacher's and the merged model's distributions "
        "are renormalised over them",
    )

    chat_template: bool = Field(
        False,
        description="causal LMs: present each input as the user turn of the tokenizer's chat template, "
        "followed by the assistant generation prompt (for the teachers and the merged model alike)",
    )
    system_prompt: str | None = Field(
        None, description="with chat_template: the system turn placed before each input"
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str | int] | None) -> list[str | int] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("'labels' needs at least two distinct labels")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        sources = [name for name in ("dataset", "path", "texts") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of 'dataset', 'path' or 'texts' (got {sources or 'none'})")
        if self.texts is not None and not any(t.strip() for t in self.texts):
            raise ValueError("'texts' holds no non-empty text")
        if self.dataset is not None and not _HUB_ID.match(self.dataset):
            raise ValueError(f"'dataset' is not a Hub dataset id: {self.dataset!r}")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("'system_prompt' needs 'chat_template: true'")
        return self


class ModelParameters(_Strict):
    weight: FiniteFloat | None = None
    density: Annotated[float, Field(gt=0.0, le=1.0)] | None = None


class ModelSpec(_Strict):
    model: str = Field(description="Hub id 'org/name[@revision]' or a local directory")
    parameters: ModelParameters = Field(default_factory=ModelParameters)
    data: DataSpec | None = None

    @field_validator("model")
    @classmethod
    def _check_ref(cls, value: str) -> str:
        return check_model_ref(value)


class MergeParameters(_Strict):
    """Global method parameters. Defaults follow the DivMerge paper and mergekit."""

    # classic
    weight: FiniteFloat | None = Field(None, description="default per-model weight")
    density: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="default density (ties/dare)"
    )
    normalize: bool | None = Field(None, description="divide by the sum of weights (default: method's own)")
    lambda_: FiniteFloat = Field(
        1.0, validation_alias=AliasChoices("lambda", "lambda_"), serialization_alias="lambda"
    )
    eps: Annotated[float, Field(gt=0)] = 1e-8
    seed: int = Field(0, description="seed for DARE's random drop and for data sampling")
    # learned
    granularity: Literal["task", "layer", "tensor"] = "layer"
    divergence: Literal["js", "kl"] = "js"
    lr: Annotated[float, Field(gt=0)] = 1e-2
    epochs: Annotated[int, Field(ge=1)] = 4
    batch_size_per_task: Annotated[int, Field(ge=1)] = 4
    init: FiniteFloat | None = Field(None, description="initial coefficient (default 1/n_tasks)")
    max_length: Annotated[int, Field(ge=1)] = 128
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    top_k: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="store only the teacher's top-k token probabilities (approximation; default full vocab)",
    )


class OutputSpec(_Strict):
    """Where the service puts the result. The CLI's --out overrides it."""

    repo_id: str | None = Field(None, description="Hub model repo to upload to (created private if missing)")
    path: str | None = Field(None, description="local directory (must be under an allow-listed root)")
    private: bool = True

    @model_validator(mode="after")
    def _one_destination(self) -> OutputSpec:
        if (self.repo_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo_id' or 'path'")
        if self.repo_id is not None and not _HUB_ID.match(self.repo_id):
            raise ValueError(f"'repo_id' is not a Hub repo id: {self.repo_id!r}")
        return self


class MergeConfig(_Strict):
    merge_method: Method = Field(validation_alias=AliasChoices("merge_method", "method"))
    base_model: str | None = None
    models: list[ModelSpec] = Field(min_length=1)
    parameters: MergeParameters = Field(default_factory=MergeParameters)
    dtype: DType = Field("float32", description="compute dtype")
    out_dtype: DType | None = Field(None, description="output dtype (default: dtype)")
    output: OutputSpec | None = None

    @field_validator("base_model")
    @classmethod
    def _check_base(cls, value: str | None) -> str | None:
        return None if value is None else check_model_ref(value)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _method_requirements(self) -> MergeConfig:
        method = self.merge_method
        if method in TASK_VECTOR_METHODS and self.base_model is None:
            raise ValueError(f"'base_model' is required for merge_method {method!r}")
        if not self.task_models():
            raise ValueError("'models' lists no model other than the base model")
        if method in LEARNED_METHODS:
            missing = [i for i, m in enumerate(self.models) if m.data is None and m.model != self.base_model]
            if missing:
                raise ValueError(
                    f"merge_method {method!r} learns from unlabelled inputs: models {missing} have no 'data'"
                )
        return self

    @property
    def output_dtype(self) -> str:
        return self.out_dtype or self.dtype

    def task_models(self) -> list[ModelSpec]:
        """The models that contribute task vectors (mergekit drops the base model from that list)."""
        if self.merge_method in TASK_VECTOR_METHODS:
            return [m for m in self.models if m.model != self.base_model]
        return list(self.models)

    def weight_of(self, spec: ModelSpec, default: float = 1.0) -> float:
        w = spec.parameters.weight
        if w is None:
            w = self.parameters.weight
        return default if w is None else float(w)

    def density_of(self, spec: ModelSpec, default: float = 0.2) -> float:
        d = spec.parameters.density
        if d is None:
            d = self.parameters.density
        return default if d is None else float(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def check_model_ref(value: str) -> str:
    """Accept a local path (absolute, ./, ../, ~, file://) or a Hub id 'org/name[@rev]'."""
    value = value.strip()
    if not value:
        raise ValueError("model reference is empty")
    if is_local_ref(value) or _HUB_ID.match(value):
        return value
    raise ValueError(f"not a Hub model id ('org/name[@revision]') nor a local path: {value!r}")


def is_local_ref(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "file://")) or value in (".", "..")


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the field path (``models.1.data.num_samples: ...``)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def parse_config(data: Any) -> MergeConfig:
    """Validate a dict (from YAML or JSON). Raises :class:`ConfigError` naming the field(s)."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping (YAML/JSON object)")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]["loc"] if err.errors() else ()
        raise ConfigError(format_validation_error(err), field=".".join(map(str, first)) or None) from None


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return parse_config(data)
