"""What changed between two distributions over many positions, token by token.

:class:`WhatChanged` streams over positions with running full-vocabulary sums (one vector per
statistic), never storing the per-position distributions:

- expected-probability difference ``dP(x) = mean_t [P_B(x | t) - P_A(x | t)]``;
- probability-weighted mean log-ratio
  ``L(x) = sum_t w_t(x) (log P_B(x|t) - log P_A(x|t)) / sum_t w_t(x)``,
  ``w_t(x) = (P_A(x|t) + P_B(x|t)) / 2`` (tokens that matter at a position weigh more).

"Boosted" tokens have the largest ``dP`` (B more likely), "suppressed" the smallest; a token
whose ``|dP|`` is at most :data:`AGREE` (float32 rounding of a probability) is neither, so two
identical models list no tokens and say that they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from divscope.divergence.fused import _fused

DEFINITION = (
    "delta_prob = mean over positions of P_b - P_a; "
    "weighted_log_ratio = sum w (log P_b - log P_a) / sum w, w = (P_a + P_b) / 2"
)

AGREE = 1e-7  # |mean P_B - P_A| at or below this is rounding, not a change
AGREE_NOTE = (
    f"A and B agree: no token's mean probability differs by more than {AGREE:g} (B raises and "
    "lowers nothing)"
)


class WhatChanged:
    """Running sums over positions of ``P_B - P_A``, ``w (log P_B - log P_A)`` and ``w``."""

    def __init__(self, vocab: int) -> None:
        self.d_prob = torch.zeros(vocab, dtype=torch.float64)
        self.lr_num = torch.zeros(vocab, dtype=torch.float64)
        self.lr_den = torch.zeros(vocab, dtype=torch.float64)
        self.n_pos = 0

    def add(self, la: torch.Tensor, lb: torch.Tensor) -> None:
        """Add positions given A's and B's log-probabilities, ``(T, V)`` each."""
        pa, pb = la.exp().double(), lb.exp().double()
        self.d_prob += (pb - pa).sum(0).cpu()
        w = 0.5 * (pa + pb)
        self.lr_num += (w * (lb - la).double()).sum(0).cpu()
        self.lr_den += w.sum(0).cpu()
        self.n_pos += la.shape[0]

    def add_logits(
        self, xa: torch.Tensor, xb: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor
    ) -> None:
        """Like :meth:`add` from logits ``(T, V)`` and their log-normalisers ``(T,)``: one
        fused pass, fp32 sums over the T positions, accumulated in float64."""
        sums = _fused(_changed_rows, xa, xb, lse_a, lse_b).double().cpu()
        self.d_prob += sums[0]
        self.lr_num += sums[1]
        self.lr_den += sums[2]
        self.n_pos += xa.shape[0]

    def sums(self) -> np.ndarray:
        """``(3, V)`` float64: the three running sums (to store, or to merge with others)."""
        return torch.stack([self.d_prob, self.lr_num, self.lr_den]).numpy()

    @classmethod
    def from_sums(cls, sums: np.ndarray, n_pos: int) -> WhatChanged:
        """Rebuild from :meth:`sums` (e.g. of several units added together)."""
        out = cls(sums.shape[1])
        out.d_prob, out.lr_num, out.lr_den = (torch.from_numpy(np.array(s)) for s in sums)
        out.n_pos = n_pos
        return out

    def tokens(self, decode: Callable[[int], str], n_tokens: int) -> dict[str, Any]:
        """The ``n_tokens`` most boosted and most suppressed tokens under B (none where the
        two sides agree: then a ``note`` says so)."""
        dp = (self.d_prob / max(self.n_pos, 1)).numpy()
        lrat = (self.lr_num / self.lr_den.clamp(min=1e-300)).numpy()

        def listing(idx: np.ndarray) -> list[dict[str, Any]]:
            return [
                {
                    "token": decode(int(i)),
                    "id": int(i),
                    "delta_prob": float(dp[i]),
                    "weighted_log_ratio": float(lrat[i]),
                }
                for i in idx
            ]

        order = np.argsort(dp)
        up = [i for i in order[::-1][:n_tokens] if dp[i] > AGREE]
        down = [i for i in order[:n_tokens] if dp[i] < -AGREE]
        out = {
            "definition": DEFINITION,
            "boosted_in_b": listing(np.array(up, dtype=int)),
            "suppressed_in_b": listing(np.array(down, dtype=int)),
        }
        if not up and not down:
            out["note"] = AGREE_NOTE
        return out


def _changed_rows(
    xa: torch.Tensor, xb: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """``(3, V)`` sums over positions of P_B - P_A, w (log P_B - log P_A) and w, from logits."""
    la, lb = xa - lse_a[:, None], xb - lse_b[:, None]
    pa, pb = la.exp(), lb.exp()
    w = 0.5 * (pa + pb)
    return torch.stack([(pb - pa).sum(0), (w * (lb - la)).sum(0), w.sum(0)])
