"""Public entry point for the divergence losses: ``from divscope.losses import KLRegularizer``.

The implementation lives in :mod:`divscope.divergence.losses`; this module only re-exports it
so that user code keeps one short, stable import path.
"""

from divscope.divergence.losses import (
    KLRegularizer,
    fused_linear_divergence,
    generalized_jsd,
    js_divergence,
    kl_divergence,
    topk_divergence,
)

__all__ = [
    "KLRegularizer",
    "fused_linear_divergence",
    "generalized_jsd",
    "js_divergence",
    "kl_divergence",
    "topk_divergence",
]
