"""Merge methods: one module per method, all listed in :mod:`.registry` (see docs/methods.md)."""

from .base import MergeMethod
from .registry import METHODS, get_method

__all__ = ["METHODS", "MergeMethod", "get_method"]
