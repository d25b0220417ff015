"""Stages built from the plan, and their pipelined execution across ranks."""

from .pipe import Pipeline

__all__ = ["Pipeline"]
