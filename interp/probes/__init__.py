"""Probes: streaming activation statistics at hook points and ridge maps solved from them."""

from interp.probes.stats import (
    RidgeFit,
    StreamingStats,
    check_hook_names,
    collect_stats,
    iter_activations,
    residual_hook_names,
    ridge_from_stats,
)

__all__ = [
    "RidgeFit",
    "StreamingStats",
    "check_hook_names",
    "collect_stats",
    "iter_activations",
    "residual_hook_names",
    "ridge_from_stats",
]
