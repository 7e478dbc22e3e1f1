"""Dtype policies: dense and quantized weight formats."""

from .base import Policy

__all__ = ["Policy"]
