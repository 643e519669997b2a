"""divmerge_core: the merging engine (DivMerge, AdaMerging and the classic methods). No web or queue code."""

from .config import MergeConfig, load_config, parse_config
from .errors import DivMergeError, MergeCancelled
from .options import EngineOptions
from .progress import ProgressEvent

__all__ = [
    "DivMergeError",
    "EngineOptions",
    "MergeCancelled",
    "MergeConfig",
    "MergePlan",
    "MergeResult",
    "ProgressEvent",
    "load_config",
    "parse_config",
    "prepare",
    "run_merge",
]

#: Exported lazily, so that importing the config schema (the service's API process) does not import torch.
_LAZY = {
    "prepare": "pipeline",
    "run_merge": "pipeline",
    "MergePlan": "plan",
    "MergeResult": "plan",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
