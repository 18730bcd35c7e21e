"""Model-merging methods for task vectors: a registry of small methods and one streaming driver (mergekit-style).

Layout (docs/ARCHITECTURE.md):
- ``registry.py``: ``Option``, ``Method`` (the structured description of a method: name, paper, reference code,
  options with their defaults, default alpha search), ``register``, option parsing;
- ``driver.py``: ``merge_stream`` / ``merge_tensors`` / ``merge_tensor`` / ``merge_files``;
- ``gta.py``: generalized task arithmetic (pluggable sparsifiers, TIES sign consensus) behind ties, dare,
  dare-ties, breadcrumbs, breadcrumbs-ties and della; ``parts.py``: shared tensor helpers; ``thresholds.py``: the
  exact streamed global top-k;
- ``methods/``: one file per method.
"""
from __future__ import annotations

from . import methods  # noqa: F401  registers every method
from .driver import (alpha_grid, check_inputs, key_generator, merge_files, merge_stream, merge_tensor, merge_tensors,
                     merged_method)
from .parts import compute_device, on_device
from .registry import (KINDS, REGISTRY, Method, Option, describe_method, get_method, list_methods, nested_options,
                       parse_option_strings, register, resolve_options)
from .thresholds import global_magnitude_thresholds

__all__ = ["KINDS", "REGISTRY", "Method", "Option", "alpha_grid", "check_inputs", "compute_device",
           "describe_method", "get_method", "global_magnitude_thresholds", "key_generator", "list_methods",
           "merge_files", "merge_stream", "merge_tensor", "merge_tensors", "merged_method", "nested_options", "on_device",
           "parse_option_strings", "register", "resolve_options"]
