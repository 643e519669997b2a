"""Merge methods. ``classic`` holds the per-tensor functions of the non-learned methods."""

from .classic import DEFAULT_NORMALIZE, merge_tensor

__all__ = ["DEFAULT_NORMALIZE", "merge_tensor"]
