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
    "ProgressEvent",
    "load_config",
    "parse_config",
]
