"""The probability thresholds swept by every command that sweeps them (one grid, one function)."""
from __future__ import annotations


def threshold_grid(extremes: bool = False) -> list[float]:
    """0.05, 0.10, ..., 0.95 (19 thresholds: the stored validation threshold, ``nnunet-ext select``); with
    ``extremes`` also 0.01, 0.02 and 0.98 (the operating-point curves of ``operating-points`` and ``compare``,
    which reach further into both ends). Sorted."""
    grid = [round(0.05 * k, 2) for k in range(1, 20)]
    return sorted(grid + [0.01, 0.02, 0.98]) if extremes else grid
