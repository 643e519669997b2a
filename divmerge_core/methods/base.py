"""What every merge method declares, and the parameter types they share.

A method is a :class:`MergeMethod`: its name, whether it needs a base model, its global and per-model
parameters as pydantic models (defaults and bounds), whether it is ``classic`` (a function streamed over
the checkpoints tensor by tensor) or ``learned`` (coefficients optimised on data first), the queue the
service sends it to, and the sentence the model card says about it. :mod:`.registry` lists them all.

Numeric parameters of classic methods are :data:`Setting` values, as in mergekit: a number, a gradient
(a list of numbers interpolated over the layers) or a list of ``{filter, value}`` conditions matched
against the tensor name (see :mod:`.settings`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, FiniteFloat

if TYPE_CHECKING:  # the registry is read by the API process, which has no torch
    import torch

Kind = Literal["classic", "learned"]
Queue = Literal["cpu", "gpu"]


class MethodParameters(BaseModel):
    """Base of every method's parameter model: unknown keys are errors naming the key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Condition(BaseModel):
    """One mergekit condition: ``value`` applies to tensors whose name contains ``filter`` (all if unset)."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: FiniteFloat | list[FiniteFloat] = Field(description="a number or a gradient over the layers")


#: A number, a gradient over the layers, or a list of conditions (first match wins).
Setting = FiniteFloat | list[FiniteFloat] | list[Condition]


def _numbers(value: Any) -> list[float]:
    if isinstance(value, list):
        out: list[float] = []
        for v in value:
            out += _numbers(v.value if isinstance(v, Condition) else v)
        return out
    return [value]


def setting(
    description: str,
    *,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """An annotated :data:`Setting` type whose every number is checked against the bounds."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, list) and not value:
            raise ValueError("an empty list sets nothing")
        for v in _numbers(value):
            if gt is not None and not v > gt:
                raise ValueError(f"must be > {gt} (got {v})")
            if le is not None and not v <= le:
                raise ValueError(f"must be <= {le} (got {v})")
        return value

    return Annotated[Setting, AfterValidator(check), Field(description=description)]


Weight = setting("the model's weight (a number, a gradient over the layers, or filtered values)")
Lambda = setting("scale of the merged task vector")


def lambda_default() -> Any:
    """``lambda`` in configs (a Python keyword, hence the field name ``lambda_``), default 1."""
    return Field(1.0, validation_alias=AliasChoices("lambda", "lambda_"), serialization_alias="lambda")


def model_default(what: str) -> Any:
    """A global ``weight``/``density``: the default of every model that does not set its own."""
    return Field(None, description=f"default {what} of every model (its own {what} wins)")


def int8_mask_field() -> Any:
    """mergekit's ``int8_mask``: accepted with a warning (:data:`MERGEKIT_NO_OPS`), changes nothing."""
    return Field(None, description="mergekit knob, accepted with a warning, changes nothing")


#: mergekit knobs accepted for compatibility although they change nothing here, with the reason.
MERGEKIT_NO_OPS = {
    "int8_mask": "accepted for mergekit compatibility and ignored: masks are boolean tensors here, "
    "the int8 storage trick saves nothing",
}


@dataclass
class TensorInputs:
    """One tensor's inputs to a classic method, parameters already evaluated for this tensor."""

    name: str
    #: The base model's tensor in the compute dtype (None for methods that do not use a base).
    base: torch.Tensor | None
    #: The task models' tensors: a ``[K, ...]`` tensor, or (``streams`` methods) an iterable that may
    #: refill one buffer, each consumed before the next. The method may overwrite them.
    models: torch.Tensor | Iterable[torch.Tensor]
    #: Per-model parameter values, one dict per task model (e.g. ``{"weight": 0.5, "density": 0.2}``).
    per_model: list[dict[str, Any]]
    #: Global parameter values (e.g. ``{"lambda_": 1.0, "normalize": True}``).
    params: dict[str, Any]
    #: Seeded per tensor (methods with ``random`` set): the same tensor gets the same draw in any run.
    generator: torch.Generator | None = None

    def column(self, key: str) -> list[float]:
        return [float(p[key]) for p in self.per_model]

    def stacked(self) -> torch.Tensor:
        import torch

        if isinstance(self.models, torch.Tensor):
            return self.models
        return torch.stack(list(self.models))


ClassicFn = Callable[[TensorInputs], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as the engine, the service and the docs see it."""

    name: str
    kind: Kind
    #: Global parameters (``parameters:`` in the config).
    parameters: type[MethodParameters]
    #: Per-model parameters (``models[].parameters``).
    model_parameters: type[MethodParameters]
    #: One sentence for the model card and the docs.
    card: str
    reference: str
    #: ``required``: task vectors need it (it is dropped from the merged models if listed there);
    #: ``optional``: used when given (multislerp's origin), dropped likewise; ``unused``: never read (a
    #: base listed among ``models`` is merged like any model).
    base: Literal["required", "optional", "unused"] = "required"
    #: The service's default queue: classic merges are memory-bound and run on the cpu queue.
    queue: Queue = "cpu"
    #: Classic methods: merges one tensor.
    merge: ClassicFn | None = None
    #: Classic methods: ``models`` may be a one-buffer iterable (the method uses one model at a time).
    streams: bool = False
    #: Classic methods: the merge draws random numbers (a seeded generator per tensor is passed).
    random: bool = False
    #: Exact number of task models (the base excluded), if the method needs one (with ``models``).
    n_models: int | None = None
    #: ``slices`` may rebuild the layer stack (mergekit's passthrough): each slice takes one model's
    #: ``layer_range``, the output's layers are the slices' in order (:mod:`divmerge_core.relayer`).
    relayers: bool = False
    #: Check of one tensor's evaluated global and per-model values, run over every tensor name before
    #: any tensor is read: returns the problem, or None.
    check: Callable[[dict[str, Any], Sequence[dict[str, Any]]], str | None] | None = None

    @property
    def learned(self) -> bool:
        return self.kind == "learned"

    @property
    def needs_base(self) -> bool:
        return self.base == "required"


class NoModelParameters(MethodParameters):
    """Methods without per-model parameters."""
