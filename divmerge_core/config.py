"""The one merge-config schema, shared by the CLI (YAML) and the service (JSON).

It follows mergekit's layout (``merge_method``, ``base_model``, ``models[].model`` or ``slices[].sources``,
per-model and global ``parameters``, ``dtype``) so mergekit configs for the supported methods load
unchanged, and adds what the learned methods need: per-model unlabelled ``data``.

``parameters`` and ``models[].parameters`` are validated against the chosen method's own parameter
models (:mod:`divmerge_core.methods`): :meth:`MergeConfig.model_validate` builds the config class of
that method, so a parameter the method does not take is an error naming its field.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigError
from .methods import registry
from .methods.base import MERGEKIT_NO_OPS, MethodParameters
from .methods.settings import Slice

METHODS = tuple(registry.METHODS)
CLASSIC_METHODS = registry.names("classic")
LEARNED_METHODS = registry.names("learned")

Method = Literal[METHODS]  # type: ignore[valid-type]
DType = Literal["float32", "bfloat16", "float16"]

_HUB_NAME = re.compile(r"^[A-Za-z0-9](?:[\w.\-]{0,94}[A-Za-z0-9])?$")
_HUB_REVISION = re.compile(r"^[\w.\-]+(?:/[\w.\-]+)*$")


def is_hub_ref(value: str, revision: bool = True) -> bool:
    """'name', 'org/name' or (with ``revision``) either followed by '@revision', by the Hub's rules: each
    part alphanumeric at both ends, no '--' or '..'; a revision (branch, tag or commit) has no '..' and no
    empty or dot-led component, so it can never climb out of the cache folder it names."""
    repo, at, rev = value.partition("@")
    parts = repo.split("/")
    if len(parts) > 2 or not all(_HUB_NAME.match(p) for p in parts) or ".." in repo or "--" in repo:
        return False
    if not at:
        return True
    return (
        revision
        and len(rev) <= 255
        and bool(_HUB_REVISION.match(rev))
        and not any(c.startswith(".") for c in rev.split("/"))
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _TaskSource(_Strict):
    """Where a task's texts come from: a Hub dataset, a local file, or inline texts (exactly one), and how
    each row becomes an input (shared by ``data`` and ``eval``)."""

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
    seed: int = 0
    chat_template: bool = Field(
        False,
        description="causal LMs: present each input as the user turn of the tokenizer's chat template, "
        "followed by the assistant generation prompt",
    )
    system_prompt: str | None = Field(
        None, description="with chat_template: the system turn placed before each input"
    )

    @model_validator(mode="after")
    def _one_source(self) -> _TaskSource:
        sources = [name for name in ("dataset", "path", "texts") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(f"give exactly one of 'dataset', 'path' or 'texts' (got {sources or 'none'})")
        if self.texts is not None and not any(t.strip() for t in self.texts):
            raise ValueError("'texts' holds no non-empty text")
        if self.dataset is not None and not is_hub_ref(self.dataset):
            raise ValueError(f"'dataset' is not a Hub dataset id: {self.dataset!r}")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("'system_prompt' needs 'chat_template: true'")
        return self


class DataSpec(_TaskSource):
    """Unlabelled inputs of one task (the learned methods' merge inputs)."""

    num_samples: int = Field(200, ge=1, description="how many inputs to use (seeded sample)")
    labels: list[str | int] | Literal["auto", "all"] | None = Field(
        None,
        description="sequence classification with one head shared by several tasks: this task's labels "
        "(names from config.json id2label, or ids); the teacher's and the merged model's distributions "
        "are renormalised over them. 'auto': the labels the task's expert predicts on the task's inputs. "
        "'all': every label of the head. Unset: the labels the expert predicts when no other task's expert "
        "predicts any of them (the tasks use separate slices of one head), else every label (DivMerge; the "
        "evaluation's argmax applies the same rule to the tasks' gold labels)",
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str | int] | str | None) -> list[str | int] | str | None:
        if isinstance(v, list) and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError("'labels' needs at least two distinct labels")
        return v


#: Most labelled examples one task's ``eval`` set may take (``num_samples``).
MAX_EVAL_SAMPLES = 5000
#: Most tokens a causal LM may generate per evaluation answer (``max_new_tokens``).
MAX_EVAL_NEW_TOKENS = 64
#: Most methods one job may compare (``evaluation.compare``).
MAX_COMPARE = 8


class EvalSpec(_TaskSource):
    """Labelled (or unlabelled) held-out inputs of one task, to score the merge against its expert.

    The sources of :class:`DataSpec`; ``label_column`` (default ``label``, when the data has that column)
    or, with inline ``texts``, ``labels`` give the gold labels. Without labels the task is scored label-free:
    the Jensen-Shannon divergence between expert and merged model on the inputs.
    """

    split: str = "validation"
    labels: list[str | int] | None = Field(
        None, description="with 'texts': each text's gold label (same length as 'texts')"
    )
    label_column: str | None = Field(
        None, description="column holding the gold label (default: 'label' when the data has one)"
    )
    max_new_tokens: int = Field(
        8, ge=1, le=MAX_EVAL_NEW_TOKENS, description="causal LMs: most tokens generated per answer"
    )
    answers: dict[str, str | list[str]] | None = Field(
        None,
        description="causal LMs: label value -> its answer word(s); the prediction is the label whose "
        "answer word occurs first in the greedy output (case-insensitive, whole word). Default: the label "
        "values themselves, when they are words",
    )
    num_samples: int = Field(
        200, ge=1, le=MAX_EVAL_SAMPLES, description="how many examples to score (seeded sample)"
    )

    @field_validator("answers")
    @classmethod
    def _answers(cls, v: dict[str, str | list[str]] | None) -> dict[str, str | list[str]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("'answers' is empty")
        for label, words in v.items():
            listed = [words] if isinstance(words, str) else words
            if not listed or not all(isinstance(w, str) and w.strip() for w in listed):
                raise ValueError(f"'answers' gives label {label!r} no answer word")
        return v

    @model_validator(mode="after")
    def _gold_labels(self) -> EvalSpec:
        if self.texts is not None:
            if self.labels is not None and len(self.labels) != len(self.texts):
                raise ValueError(f"'labels' gives {len(self.labels)} label(s) for {len(self.texts)} text(s)")
            if self.label_column is not None:
                raise ValueError("'label_column' applies to 'dataset' and 'path'; give 'labels' with 'texts'")
        elif self.labels is not None:
            raise ValueError("'labels' goes with 'texts'; use 'label_column' with 'dataset' and 'path'")
        return self


class ModelSpec(_Strict):
    model: str = Field(min_length=1, description="Hub id 'org/name[@revision]' or a local directory")
    name: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="the task's name in the evaluation (default: the folder or repo name)",
    )
    #: The method's per-model parameters (``MergeConfig.model_validate`` sets the method's own class).
    parameters: MethodParameters = Field(default_factory=MethodParameters)
    data: DataSpec | None = None
    eval: EvalSpec | None = Field(None, description="held-out examples the merge is scored on, per task")

    @property
    def task_name(self) -> str:
        """``name``, else the last part of the folder or repo name (revision left out)."""
        if self.name:
            return self.name
        ref = self.model.rsplit("+", 1)[-1].strip()  # a LoRA expert is named after its adapter
        ref = ref.partition("@")[0] if not is_local_ref(ref) else ref
        return ref.rstrip("/").rsplit("/", 1)[-1] or ref

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("model")
    @classmethod
    def _check_ref(cls, value: str) -> str:
        return check_model_ref(value)


class OutputSpec(_Strict):
    """Where the service puts the result. The CLI's --out overrides it."""

    repo_id: str | None = Field(None, description="Hub model repo to upload to (created private if missing)")
    path: str | None = Field(None, description="local directory (must be under an allow-listed root)")
    private: bool = True
    overwrite: bool = Field(
        False, description="replace an existing local output directory (the CLI's --force)"
    )

    @model_validator(mode="after")
    def _one_destination(self) -> OutputSpec:
        if (self.repo_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo_id' or 'path'")
        if self.repo_id is not None and not is_hub_ref(self.repo_id, revision=False):
            raise ValueError(f"'repo_id' is not a Hub repo id: {self.repo_id!r}")
        return self


class SliceSource(_Strict):
    """One model's layers in a mergekit slice."""

    model: str
    layer_range: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]
    parameters: MethodParameters | None = None

    @field_validator("model")
    @classmethod
    def _check_ref(cls, value: str) -> str:
        return check_model_ref(value)

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        if self.layer_range[1] <= self.layer_range[0]:
            raise ValueError(f"'layer_range' {list(self.layer_range)} is empty")
        return self


class SliceSpec(_Strict):
    """mergekit's ``slices[]``: layers merged with their own parameters (the layer layout is kept)."""

    sources: list[SliceSource] = Field(min_length=1)
    parameters: MethodParameters | None = None


class CompareSpec(_Strict):
    """One more method run on the same experts and evaluated beside the job's own (``evaluation.compare``)."""

    merge_method: Method = Field(validation_alias=AliasChoices("merge_method", "method"))
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="that method's parameters (default: its own defaults)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"merge_method": data} if isinstance(data, str) else data


class EvaluationSpec(_Strict):
    """What the evaluation stage does beyond scoring the merge on each model's ``eval`` set."""

    compare: list[CompareSpec] = Field(
        default_factory=list,
        max_length=MAX_COMPARE,
        description="other methods run on the same experts and evaluated too, e.g. [task_arithmetic, ties]",
    )
    select: Literal["best"] | None = Field(
        None,
        description="'best': the merge with the highest ANP becomes the output (the others are reported)",
    )
    base: bool = Field(False, description="score the base model too")


#: ``tokenizer_source`` / ``tokenizer.source`` values that are not a model reference.
TOKENIZER_KINDS = ("base", "union")


def check_tokenizer_source(value: str) -> str:
    """'base', 'union' or a model reference (mergekit's; ``model:<ref>`` is accepted for the same ref)."""
    value = value.strip()
    if value in TOKENIZER_KINDS:
        return value
    ref = value.removeprefix("model:").strip()
    try:
        return check_model_ref(ref)
    except ValueError as err:
        raise ValueError(f"is 'base', 'union' or a model reference: {err}") from None


class ZeroEmbedding(_Strict):
    """A new token's row is all zeros."""

    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """A new token's row is another token's row in one model (by token text or id in that model)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @field_validator("model")
    @classmethod
    def _check_ref(cls, value: str) -> str:
        return check_model_ref(value)

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


def _token_source_kind(value: Any) -> str:
    """A token's embedding source: a model reference (a string) or a ``kind`` block."""
    if isinstance(value, str):
        return "model"
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in ("zero", "model_token") else "model_token"


class TokenEmbeddingSpec(_Strict):
    """mergekit's per-token embedding source: a model of the merge (its row of this token), a
    ``model_token`` or ``zero``; ``force`` gives that row to every model, even those that have the token."""

    source: (
        Annotated[
            Annotated[ZeroEmbedding, Tag("zero")]
            | Annotated[ModelTokenEmbedding, Tag("model_token")]
            | Annotated[str, Tag("model")],
            Discriminator(_token_source_kind),
        ]
        | None
    ) = None
    force: bool = False

    @field_validator("source")
    @classmethod
    def _check_ref(cls, value: Any) -> Any:
        return check_model_ref(value) if isinstance(value, str) else value


class TokenizerSpec(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary and how rows of tokens a model lacks are filled."""

    source: str = Field(
        "union", description="'union' (every model's tokens), 'base' (the base model's) or a model reference"
    )
    tokens: dict[str, TokenEmbeddingSpec] | None = Field(
        None, description="token -> where its row comes from (tokens not in the vocabulary are added)"
    )
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        description="pad the vocabulary size up to a multiple of this (padding rows: the mean row)",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        return check_tokenizer_source(value)

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, value: dict[str, TokenEmbeddingSpec] | None) -> dict[str, TokenEmbeddingSpec] | None:
        if value is not None and any(not t for t in value):
            raise ValueError("a token is the empty string")
        return value


class MergeConfig(_Strict):
    merge_method: Method = Field(validation_alias=AliasChoices("merge_method", "method"))
    base_model: Annotated[str, Field(min_length=1)] | None = None
    models: list[ModelSpec] = Field(min_length=1)
    slices: list[SliceSpec] | None = Field(
        None, description="mergekit slices (instead of 'models'): per-layer-range parameters"
    )
    parameters: MethodParameters = Field(default_factory=dict, validate_default=True)
    dtype: DType = Field("float32", description="compute dtype")
    out_dtype: DType | None = Field(None, description="output dtype (default: dtype)")
    output: OutputSpec | None = None
    evaluation: EvaluationSpec | None = Field(
        None, description="compare methods and select the best (needs 'eval' on the models)"
    )
    tokenizer_source: str | None = Field(
        None,
        description="merge models with different vocabularies: 'base', 'union' or a model reference "
        "(mergekit's; the same as tokenizer: {source: ...})",
    )
    tokenizer: TokenizerSpec | None = Field(
        None, description="mergekit's tokenizer block: source, per-token embedding sources, padding"
    )
    chat_template: str | None = Field(
        None,
        description="the output tokenizer's chat template: 'auto' (the most common among the models), "
        "'chatml', 'llama3' or a Jinja template",
    )

    @field_validator("tokenizer_source")
    @classmethod
    def _check_tokenizer_source(cls, value: str | None) -> str | None:
        return None if value is None else check_tokenizer_source(value)

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str | None) -> str | None:
        from .chat_templates import check_chat_template

        return None if value is None else check_chat_template(value)

    @field_validator("base_model")
    @classmethod
    def _check_base(cls, value: str | None) -> str | None:
        return None if value is None else check_model_ref(value)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> MergeConfig:
        """Validate with the config class of ``obj``'s merge method (its own parameter models)."""
        if cls is MergeConfig and isinstance(obj, dict):
            name = obj.get("merge_method", obj.get("method"))
            if isinstance(name, str) and name in registry.METHODS:
                return config_class(name).model_validate(obj, *args, **kwargs)
        return super().model_validate(obj, *args, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _models_from_slices(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("slices") is not None:
            if data.get("models") is not None:
                raise ValueError("give either 'models' or 'slices', not both")
            sources = [
                s.get("model")
                for sl in data["slices"]
                if isinstance(sl, dict)
                for s in sl.get("sources") or []
                if isinstance(s, dict)
            ]
            data = {
                **data,
                "models": [{"model": m} for m in dict.fromkeys(sources) if isinstance(m, str)] or None,
            }
        return data

    @model_validator(mode="after")
    def _method_requirements(self) -> MergeConfig:
        method = self.method
        name = self.merge_method
        if method.needs_base and self.base_model is None:
            _fail(("base_model",), f"'base_model' is required for merge_method {name!r}")
        tasks = self.task_models()
        if not tasks:
            _fail(("models",), "'models' lists no model other than the base model")
        relayered = method.relayers and self.slices is not None
        if method.n_models is not None and len(tasks) != method.n_models and not relayered:
            _fail(
                ("models",),
                f"merge_method {name!r} merges the base with exactly {method.n_models} other model(s), "
                f"got {len(tasks)}",
            )
        if method.learned:
            missing = [i for i, m in enumerate(self.models) if m.data is None and m.model != self.base_model]
            if missing:
                _fail(
                    ("models", missing[0], "data"),
                    f"merge_method {name!r} learns from unlabelled inputs: models {missing} have no 'data'",
                )
        _check_evaluation(self)
        _check_tokenizer(self)
        if relayered:
            _check_relayering_slices(self.slices)
        elif self.slices is not None:
            _check_slices(self.slices, [m.model for m in self.models])
        else:
            required = [k for k, f in method.parameters.model_fields.items() if f.is_required()]
            missing_keys = [k for k in required if getattr(self.parameters, k) is None]
            if missing_keys:
                _fail(("parameters", missing_keys[0]), f"merge_method {name!r} needs this parameter")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """With ``slices``, ``models`` is derived from them: left out, so that a dump loads again."""
        data = handler(self)
        if self.slices is not None:
            data.pop("models", None)
        return data

    @property
    def method(self) -> registry.MergeMethod:
        return registry.get_method(self.merge_method)

    def warnings(self) -> list[str]:
        """mergekit knobs that were accepted but change nothing here, one line each naming the field."""
        out = []
        for where, params in [("parameters", self.parameters)] + [
            (f"slices.{i}.parameters", s.parameters) for i, s in enumerate(self.slices or [])
        ]:
            for key in sorted(MERGEKIT_NO_OPS.keys() & (params.model_fields_set if params else set())):
                out.append(f"{where}.{key}: {MERGEKIT_NO_OPS[key]}")
        return out

    def layer_slices(self) -> list[Slice] | None:
        """The slices as layer ranges with their parameters (model index -> parameters), or None."""
        if self.slices is None:
            return None
        return [
            Slice(
                s.sources[0].layer_range[0],
                s.sources[0].layer_range[1],
                s.parameters,
                {src.model: src.parameters for src in s.sources if src.parameters is not None},
            )
            for s in self.slices
        ]

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """``tokenizer``, or ``tokenizer_source`` as a block with that source; None without either."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSpec(source=self.tokenizer_source)

    @property
    def output_dtype(self) -> str:
        return self.out_dtype or self.dtype

    def task_models(self) -> list[ModelSpec]:
        """The models merged (mergekit drops the base model from that list when the method uses one)."""
        if self.method.base != "unused" and self.base_model is not None:
            return [m for m in self.models if m.model != self.base_model]
        return list(self.models)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def _fail(loc: tuple[str | int, ...], message: str) -> None:
    """A validation error at ``loc`` (a check that needs several fields still names the one at fault)."""
    error = InitErrorDetails(type=PydanticCustomError("method_requirement", message), loc=loc, input=None)
    raise ValidationError.from_exception_data("MergeConfig", [error])


def _check_evaluation(config: MergeConfig) -> None:
    """Evaluated tasks' names are unique; ``evaluation`` needs ``eval`` sets; compared methods fit."""
    tasks = config.task_models()
    evaluated = [m for m in tasks if m.eval is not None]
    names: dict[str, int] = {}  # the evaluation reports by task name: those must differ
    for i, m in enumerate(config.models):
        if m in tasks and m.eval is not None:
            if m.task_name in names:
                _fail(
                    ("models", i, "name"),
                    f"two models are named {m.task_name!r} (models {names[m.task_name]} and {i}); "
                    "give each a distinct 'name'",
                )
            names[m.task_name] = i
    if config.evaluation is None:
        return
    if not evaluated:
        _fail(("evaluation",), "'evaluation' needs an 'eval' set on at least one model")
    for i, c in enumerate(config.evaluation.compare):
        if c.merge_method == config.merge_method and not c.parameters:
            _fail(
                ("evaluation", "compare", i),
                f"{c.merge_method!r} is the job's own method; give it other 'parameters'",
            )
        try:
            compare_config(config, c)
        except ValidationError as err:
            _fail(("evaluation", "compare", i), format_validation_error(err, c.merge_method))


def _check_tokenizer(config: MergeConfig) -> None:
    """One tokenizer field at most, not with a learned method or a layer-rebuilding merge, and every
    model a token's row comes from is a model of the merge."""
    if config.tokenizer_source is not None and config.tokenizer is not None:
        _fail(("tokenizer",), "give either 'tokenizer_source' or 'tokenizer', not both (as in mergekit)")
    field = "tokenizer" if config.tokenizer is not None else "tokenizer_source"
    spec = config.tokenizer_spec
    if spec is None:
        return
    if config.method.learned:
        _fail(
            (field,),
            f"'{field}' is not supported with merge_method {config.merge_method!r}: a learned merge "
            "needs experts that share one vocabulary",
        )
    if config.method.relayers and config.slices is not None:
        _fail((field,), f"'{field}' is not supported with passthrough 'slices' (frankenmerges)")
    refs = set(([config.base_model] if config.base_model else []) + [m.model for m in config.models])
    for token, t in (spec.tokens or {}).items():
        source = t.source.model if isinstance(t.source, ModelTokenEmbedding) else t.source
        if isinstance(source, str) and source not in refs:
            where = ("tokenizer", "tokens", token, "source") + (
                ("model",) if not isinstance(t.source, str) else ()
            )
            _fail(where, f"token {token!r} takes its row from {source!r}, which is not a model of the merge")


def compare_config(config: MergeConfig, compare: CompareSpec) -> MergeConfig:
    """The config of a compared method: the same models, data and eval sets, that method's parameters
    (per-model parameters left at the method's defaults), no ``evaluation`` and no ``output``."""
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    data.pop("evaluation", None)
    data.pop("output", None)
    data.pop("slices", None)
    data["merge_method"] = compare.merge_method
    data["parameters"] = dict(compare.parameters)
    data["models"] = [
        m.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"parameters"})
        for m in config.models
    ]
    return MergeConfig.model_validate(data)


def _check_slices(slices: list[SliceSpec], models: list[str]) -> None:
    """Only slices that keep the layer layout: each output layer range is the same range of every
    model, the ranges follow each other from layer 0 (the end is checked against the models in prepare)."""
    end = 0
    for i, s in enumerate(slices):
        ranges = {tuple(src.layer_range) for src in s.sources}
        if len(ranges) != 1:
            _fail(
                ("slices", i, "sources"),
                "every source must take the same 'layer_range' (the layer layout is kept; "
                f"got {sorted(ranges)})",
            )
        start, stop = ranges.pop()
        if start != end:
            _fail(
                ("slices", i, "sources"),
                f"'layer_range' starts at {start}, expected {end} (slices must follow each other)",
            )
        names = [src.model for src in s.sources]
        if len(set(names)) != len(names) or set(names) != set(models):
            _fail(
                ("slices", i, "sources"), "the sources must list each model once (the models of every slice)"
            )
        end = stop


def _check_relayering_slices(slices: list[SliceSpec]) -> None:
    """passthrough's slices (mergekit's frankenmerges): one source each, any layer range of it."""
    for i, s in enumerate(slices):
        if len(s.sources) != 1:
            _fail(
                ("slices", i, "sources"),
                f"a passthrough slice takes exactly one source (got {len(s.sources)}); its layers are "
                "copied into the output in order",
            )


@cache
def config_class(method: str) -> type[MergeConfig]:
    """The :class:`MergeConfig` subclass whose ``parameters`` fields are ``method``'s own."""
    m = registry.get_method(method)
    spec = create_model(
        f"ModelSpec_{method}",
        __base__=ModelSpec,
        parameters=(m.model_parameters, Field(default_factory=dict, validate_default=True)),
    )
    source = create_model(
        f"SliceSource_{method}", __base__=SliceSource, parameters=(m.model_parameters | None, None)
    )
    slice_spec = create_model(
        f"SliceSpec_{method}",
        __base__=SliceSpec,
        sources=(list[source], Field(min_length=1)),  # type: ignore[valid-type]
        parameters=(_partial(m.parameters) | None, None),
    )
    return create_model(
        f"MergeConfig_{method}",
        __base__=MergeConfig,
        merge_method=(Literal[method], Field(validation_alias=AliasChoices("merge_method", "method"))),
        models=(list[spec], Field(min_length=1)),  # type: ignore[valid-type]
        slices=(list[slice_spec] | None, None),  # type: ignore[valid-type]
        parameters=(_partial(m.parameters), Field(default_factory=dict, validate_default=True)),
    )


def _partial(params: type[MethodParameters]) -> type[MethodParameters]:
    """``params`` with its required fields optional (None): slices may give them instead, and prepare
    checks that every tensor gets a value."""
    required = {k: f for k, f in params.model_fields.items() if f.is_required()}
    if not required:
        return params
    fields: dict[str, Any] = {
        k: (f.annotation | None, FieldInfo.merge_field_infos(f, default=None)) for k, f in required.items()
    }
    return create_model(f"{params.__name__}_partial", __base__=params, **fields)


def check_model_ref(value: str) -> str:
    """Accept a local path (absolute, ./, ../, ~, file://) or a Hub id 'org/name[@rev]', or a LoRA expert
    'base+adapter' (mergekit's syntax: one '+', each side either of those)."""
    value = value.strip()
    if not value:
        raise ValueError("model reference is empty")
    if "+" in value and is_whole_local_folder(value):
        return value
    if value.count("+") == 1:
        base, adapter = (p.strip() for p in value.split("+"))
        for part, what in ((base, "base"), (adapter, "adapter")):
            if not (is_local_ref(part) or is_hub_ref(part)):
                raise ValueError(
                    f"LoRA expert {value!r} ('base+adapter'): the {what} {part!r} is not a Hub model id "
                    "('org/name[@revision]') nor a local path"
                )
        return value
    if value.count("+") > 1:
        raise ValueError(f"model reference {value!r} has more than one '+' (a LoRA expert is 'base+adapter')")
    if is_local_ref(value) or is_hub_ref(value):
        return value
    raise ValueError(f"not a Hub model id ('org/name[@revision]') nor a local path: {value!r}")


def is_local_ref(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "file://")) or value in (".", "..")


def is_whole_local_folder(value: str) -> bool:
    """A local path naming an existing folder as written, ``+`` and all (``out/sst2+qnli``, a merge output):
    that folder, never split as mergekit's ``base+adapter``."""
    path = value.removeprefix("file://")
    return is_local_ref(value) and Path(path).expanduser().is_dir()


def format_validation_error(err: ValidationError, method: str | None = None) -> str:
    """One line per problem, each naming the field path (``models.1.data.num_samples: ...``).

    A parameter the merge method does not take says so, with the parameters it does take.
    """
    lines = []
    m = registry.METHODS.get(method) if isinstance(method, str) else None
    for e in err.errors()[:10]:
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if m is not None and e["type"] == "extra_forbidden" and "parameters" in e["loc"][:-1]:
            per_model = (
                e["loc"][0] in ("models", "slices") and "sources" in e["loc"] or e["loc"][0] == "models"
            )
            fields = (m.model_parameters if per_model else m.parameters).model_fields
            takes = ", ".join(f.serialization_alias or k for k, f in fields.items()) or "none"
            msg = f"merge_method {m.name!r} has no {'per-model ' if per_model else ''}parameter {e['loc'][-1]!r} (it takes: {takes})"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_config(data: Any) -> MergeConfig:
    """Validate a dict (from YAML or JSON). Raises :class:`ConfigError` naming the field(s)."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping (YAML/JSON object)")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]["loc"] if err.errors() else ()
        method = data.get("merge_method", data.get("method"))
        raise ConfigError(
            format_validation_error(err, method), field=".".join(map(str, first)) or None
        ) from None


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
