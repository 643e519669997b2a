"""Engine errors. Each carries a stable ``code`` and a message written for the person who sent the config."""

from __future__ import annotations


class DivMergeError(Exception):
    """Base class: ``code`` is stable (the service returns it), ``str(err)`` is the human reason."""

    code = "merge_failed"
    #: Whether retrying the same job could succeed (network hiccup, Hub 5xx). Validation errors never are.
    transient = False

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class ConfigError(DivMergeError):
    """The merge config itself is invalid (the field path is in ``field``)."""

    code = "invalid_config"


class PathNotAllowedError(ConfigError):
    code = "path_not_allowed"


class ModelNotFoundError(DivMergeError):
    code = "model_not_found"


class DatasetError(DivMergeError):
    """A dataset could not be found, read, or yielded no usable text."""

    code = "invalid_dataset"


class UnsafeCheckpointError(DivMergeError):
    """Only pickle weights, or quantized weights, or anything else we refuse to load."""

    code = "unsafe_checkpoint"


class UnsupportedAdapterError(UnsafeCheckpointError):
    """A LoRA adapter of a kind the engine does not apply (DoRA, convolution LoRA, ...)."""

    code = "unsupported_adapter"


class IncompatibleModelsError(DivMergeError):
    """The models cannot be merged; ``problems`` lists every mismatch found."""

    code = "incompatible_models"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "; ".join(problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"models cannot be merged: {shown}{more}")


class NumericalError(DivMergeError):
    """The optimisation or the merge produced NaN or inf."""

    code = "numerical_error"


class TransientError(DivMergeError):
    """A network or Hub failure that may succeed on retry."""

    code = "hub_unavailable"
    transient = True


def http_status(err: BaseException) -> int | None:
    """The HTTP status an error carries (``err.response.status_code``: huggingface_hub, httpx, requests)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP stacks the Hub client may use (imported if installed)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(types)


def is_transient(err: BaseException) -> bool:
    """Whether retrying could succeed: the one place this is decided, by exception type and HTTP status.

    A :class:`DivMergeError` says so itself (``transient``); an HTTP error is transient on 5xx and 429
    only; connection and timeout errors are; anything else is not. Explicit causes (``raise ... from``)
    are followed, so a wrapper around a connection error counts as one.
    """
    network = _network_errors()
    current: BaseException | None = err
    for _ in range(8):
        if current is None:
            break
        if isinstance(current, DivMergeError):
            return current.transient
        status = http_status(current)
        if status is not None:
            return status >= 500 or status == 429
        if isinstance(current, network):
            return True
        current = current.__cause__
    return False


class EvaluationError(DivMergeError):
    """The evaluation stage failed after the merge finished (the merge itself is kept)."""

    code = "evaluation_failed"


class MergeCancelled(DivMergeError):
    code = "cancelled"

    def __init__(self, message: str = "the merge was cancelled"):
        super().__init__(message)


class OutputExistsError(ConfigError):
    """The output path exists and is not an empty directory (and replacing it was not asked for)."""

    code = "output_exists"


class InsufficientMemoryError(ConfigError):
    """A learned merge fits in no placement; ``estimate`` holds the figures (refused before loading anything)."""

    code = "insufficient_memory"

    def __init__(self, message: str, estimate: dict):
        super().__init__(message, field="parameters.placement")
        self.estimate = estimate
