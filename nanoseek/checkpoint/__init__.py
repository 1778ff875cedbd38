"""Hugging Face checkpoint directories in and out, the FP8 block format, parameter accounting."""

from nanoseek.checkpoint.io import CheckpointError, load, save

__all__ = ["CheckpointError", "load", "save"]
