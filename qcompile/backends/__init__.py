"""Backends: each lowers the converted Q/DQ graph to real kernels behind one protocol."""
from .base import BACKENDS, Artifact, Backend, Capabilities, get_backend, lower

__all__ = ["BACKENDS", "Artifact", "Backend", "Capabilities", "get_backend", "lower"]
