"""Moved to :mod:`captioner.kernels`, the home of every fused kernel; this name stays only
until ``captioner/decoder.py`` imports :class:`StepWeight` from there."""

from captioner.kernels import StepSum, StepWeight

__all__ = ["StepSum", "StepWeight"]
