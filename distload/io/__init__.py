"""Executing read items: coalesced preads into bounded, reusable buffers."""

from .reader import ReadStats, read_tensors

__all__ = ["ReadStats", "read_tensors"]
