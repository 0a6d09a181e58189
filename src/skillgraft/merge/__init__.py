"""Merging: pure per-tensor merge methods (``methods/``), their registry, configs and the streaming engine.

A method sees one tensor name's inputs (a :class:`TensorJob`) and returns the merged delta; the engine owns
reading, writing, threads, dtypes and memory.
"""

from skillgraft.merge.registry import REGISTRY, MethodInfo, TensorJob, get_method, merge_method

__all__ = ["REGISTRY", "MethodInfo", "TensorJob", "get_method", "merge_method"]
