"""Shared divergence math on log-probabilities, in nats (torch).

``fused``: KL, JS and the fused per-position pass (log-softmax of both sides, JS and both KLs
over the whole vocabulary in one sweep) that the teacher-forcing scorer runs. ``losses``: the
same quantities as differentiable losses for fine-tuning (NaN-safe on masked vocabularies,
generalised JSD, top-k with a tail bucket, fused linear + divergence); users import them from
:mod:`divscope.losses`.
"""
