"""`frozen_heap`: a conversion's objects, and not the libraries', for the cyclic garbage collector."""

from __future__ import annotations

import contextlib
import gc

_depth = 0


@contextlib.contextmanager
def frozen_heap():
    """While inside (a `with` block or a decorated function), the cyclic garbage collector ignores
    every object that existed on entry (gc.freeze; undone on leaving the outermost one). A
    conversion makes many short-lived objects, which trigger collections, and each full collection
    walked all of torch's and transformers' objects, ~0.15 s each (three in a 32-layer conversion);
    objects made inside are collected as usual."""
    global _depth
    if _depth == 0:
        gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()
