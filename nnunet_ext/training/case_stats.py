"""Per-case statistics of a fold's preprocessed labels, counted once per case and cached.

Used by the class-prior output bias (:mod:`nnunet_ext.training.prior`) and the weighted BCE's class weight
(:mod:`nnunet_ext.training.class_weights`). The cache is a JSON file ``case -> counts`` in a subfolder of the
preprocessed configuration folder (nnU-Net infers its dataset class from the files beside the cases), written
atomically; a case whose cached entry ``valid`` rejects is counted again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def cached_case_counts(dataset, identifiers, cache_path, count: Callable, valid: Callable) -> list:
    """``[count(seg) for each case]`` with ``seg`` the case's label array (channel 0 of nnU-Net's
    ``dataset.load_case(key)[1]``); entries of ``cache_path`` that ``valid`` accepts are reused, new ones are
    written back (``cache_path`` None: no cache)."""
    cache_path = Path(cache_path) if cache_path is not None else None
    cache = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    changed, out = False, []
    for key in identifiers:
        counts = cache.get(key)
        if not valid(counts):
            _, seg, _, _ = dataset.load_case(key)
            counts = count(seg[0])
            cache[key] = counts
            changed = True
        out.append(counts)
    if changed and cache_path is not None:
        from nnunet_ext.core.safety import atomic_write_text

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps(cache))
    return out
