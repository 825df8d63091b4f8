"""Peak memory and time of the chunked fused-linear divergence against the plain path.

Workload: N positions of SmolLM2-sized hidden states (H = 576) and vocabulary (V = 49,152),
KL(model || ref) with the reference given by its own hidden states and output embedding,
forward + backward. The plain path materialises ``(N, V)`` logits for both models; the fused
path only ``(chunk, V)``. Each variant runs in a fresh subprocess; peak memory is the
process's peak RSS minus its RSS after the inputs were allocated. Both must agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info, status_mb, write_result


def child(variant: str, n: int, chunk: int) -> dict:
    import torch

    from divscope.divergence.losses import fused_linear_divergence, kl_divergence

    torch.manual_seed(0)
    torch.set_num_threads(2)
    h, v = 576, 49152
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.02).requires_grad_(True)
    ref_h, ref_w = torch.randn(n, h), torch.randn(v, h) * 0.02
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    if variant == "plain":
        loss = kl_divergence(hidden @ weight.T, ref_h @ ref_w.T)
    else:
        loss = fused_linear_divergence(
            hidden, weight, ref_h, ref_w, direction="reverse", chunk_size=chunk
        )
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "loss": loss.item(),
        "grad_norm": hidden.grad.norm().item(),
        "seconds": seconds,
        "peak_extra_mb": peak - base,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/losses_memory.json")
    ap.add_argument("--child", default=None)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.positions, args.chunk)
    runs = {}
    for variant in ("plain", "fused"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_losses",
                "--child",
                variant,
                "--positions",
                str(args.positions),
                "--chunk",
                str(args.chunk),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs[variant] = json.loads(out.stdout)
    p, f = runs["plain"], runs["fused"]
    result = {
        "peak_memory_ratio_plain_over_fused": p["peak_extra_mb"] / max(f["peak_extra_mb"], 1.0),
        "plain_peak_extra_mb": p["peak_extra_mb"],
        "fused_peak_extra_mb": f["peak_extra_mb"],
        "time_ratio_fused_over_plain": f["seconds"] / p["seconds"],
        "loss_rel_diff": abs(p["loss"] - f["loss"]) / abs(p["loss"]),
        "grad_norm_rel_diff": abs(p["grad_norm"] - f["grad_norm"]) / p["grad_norm"],
        "workload": {
            "positions": args.positions,
            "hidden": 576,
            "vocab": 49152,
            "chunk": args.chunk,
            "divergence": "KL(model || ref), forward+backward",
        },
        "runs": runs,
        "machine": machine_info(),
    }
    assert result["loss_rel_diff"] < 1e-5 and result["grad_norm_rel_diff"] < 1e-4
    write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
