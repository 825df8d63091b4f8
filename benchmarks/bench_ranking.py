"""Prompt ranking at scale: divscope's load + rank against a per-token Python loop.

Workload (synthetic, generated here): 1,000 prompts x 5 samples x 200 tokens x top-20 per
model, with aligned cross-scores both ways, as divscope JSONL. The baseline reads the JSONL
line by line with ``json`` and walks the per-token dicts to compute the same point estimates
(mc_kl, both top-k bounds, legacy_aligned; both directions); its JSON parsing and its loop are
timed apart. divscope converts each file once to the packed ``.npz`` (timed, reported, like
sampling not part of a ranking run), then loads the pair and ranks it with 1,000 bootstrap
resamples per metric. The headline ``speedup_vs_loop`` compares the loop alone (its parsing
left out) with divscope's load + rank. Both must agree to 1e-9 on mc_kl and legacy_aligned;
the loop's top-k bounds are the older tail-bucket ones, which divscope's capped lower bounds
(and its JS upper bound, more work the loop does not do) must never fall below.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, write_result
from divscope.estimators.ranking import rank_prompts
from divscope.samples import load_pair, load_samples
from divscope.samples.packed import write_samples_packed


def make_files(d: Path, n_prompts: int, n_samples: int, length: int, k: int, seed: int = 0):
    """Write A.jsonl and B.jsonl: random top-k distributions and aligned cross-scores."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"tok{i}" for i in range(500)])

    def topk(n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.argpartition(rng.random((n, len(vocab))), k, axis=1)[:, :k]  # k distinct
        lps = -np.cumsum(rng.exponential(0.6, size=(n, k)), axis=1)
        return ids, lps

    def cols(ids: np.ndarray, lps: np.ndarray, tok: np.ndarray, lp: np.ndarray) -> dict:
        return {  # float32 values, as divscope's sampler writes them
            "tokens": vocab[tok].tolist(),
            "logprobs": lp.astype(np.float32).tolist(),
            "top_tokens": vocab[ids].tolist(),
            "top_logprobs": lps.astype(np.float32).tolist(),
        }

    def response(other: str) -> dict:
        ids, lps = topk(length)
        pick = rng.integers(0, k, length)
        tok = ids[np.arange(length), pick]
        lp = lps[np.arange(length), pick]
        q_ids, q_lps = topk(length)  # Q's top-k; Q's logprob of P's token:
        hit = q_ids == tok[:, None]
        q_lp = np.where(hit.any(1), np.where(hit, q_lps, 0).sum(1), q_lps[:, -1] - 1.0)
        return {
            "text": "".join(vocab[tok]),
            "logprobs": cols(ids, lps, tok, lp),
            "cross_scores": {other: {"aligned": True, **cols(q_ids, q_lps, tok, q_lp)}},
        }

    for name, model, other in (("A", "model-a", "model-b"), ("B", "model-b", "model-a")):
        with (d / f"{name}.jsonl").open("w") as f:
            for i in range(n_prompts):
                rec = {
                    "format": "divscope.samples/1",
                    "index": i,
                    "prompt": f"prompt {i}",
                    "model": model,
                    "responses": [response(other) for _ in range(n_samples)],
                }
                f.write(json.dumps(rec) + "\n")
    return d / "A.jsonl", d / "B.jsonl"


# ------------------------------------------------------------------ the loop baseline


def _coarse(p: dict, q: dict) -> tuple[float, float]:
    pk = {p["tok"]: p["lp"]} | {t: v for t, v in p["top"] if t != p["tok"]}
    qk = {q["tok"]: q["lp"]} | {t: v for t, v in q["top"] if t != q["tok"]}
    known = [t for t in pk if t in qk]
    ps = [math.exp(pk[t]) for t in known]
    qs = [math.exp(qk[t]) for t in known]
    ps.append(max(0.0, 1 - sum(ps)))
    qs.append(max(1e-12, 1 - sum(qs)))
    kl = js = 0.0
    for a, b in zip(ps, qs, strict=True):
        m = 0.5 * (a + b)
        if a > 0:
            kl += a * math.log(a / b)
            js += 0.5 * a * math.log(a / m)
        if b > 0:
            js += 0.5 * b * math.log(b / m)
    return max(kl, 0.0), min(max(js, 0.0), math.log(2))


def _positions(cols: dict) -> list[dict]:
    return [
        {"tok": t, "lp": v, "top": list(zip(tt, tl, strict=True))}
        for t, v, tt, tl in zip(
            cols["tokens"], cols["logprobs"], cols["top_tokens"], cols["top_logprobs"], strict=True
        )
    ]


def _loop_prompt(ra: dict, rb: dict) -> dict:
    res = {}
    for suffix, rx, ry, other in (("_ab", ra, rb, "model-b"), ("_ba", rb, ra, "model-a")):
        mc = kl = js = 0.0
        n = 0
        for r in rx["responses"]:
            own, cross = _positions(r["logprobs"]), _positions(r["cross_scores"][other])
            for p, q in zip(own, cross, strict=True):
                mc += p["lp"] - q["lp"]
                k, j = _coarse(p, q)
                kl, js, n = kl + k, js + j, n + 1
        res["mc_kl" + suffix], res["topk_kl_lb" + suffix] = mc / n, kl / n
        res["topk_js_lb" + suffix] = js / n
        vals = []
        for x in rx["responses"]:
            for y in ry["responses"]:
                px, py = _positions(x["logprobs"]), _positions(y["logprobs"])
                tot, m = 0.0, 0
                for a, b in zip(px, py, strict=False):
                    lq = (
                        b["lp"]
                        if b["tok"] == a["tok"]
                        else next((v for t, v in b["top"] if t == a["tok"]), None)
                    )
                    if lq is not None:
                        tot += math.exp(a["lp"]) * (a["lp"] - lq)
                        m += 1
                if m:
                    vals.append(tot / m)
        res["legacy_aligned" + suffix] = sum(vals) / len(vals)
    return res


def loop_baseline(path_a: Path, path_b: Path) -> tuple[list[dict], float, float]:
    """The per-token loop, reading both files line by line.

    Returns:
        ``(scores per prompt, seconds parsing JSON, seconds in the loop)``.
    """
    out = []
    parse_s = loop_s = 0.0
    with path_a.open() as fa, path_b.open() as fb:
        for la, lb in zip(fa, fb, strict=True):
            t0 = time.perf_counter()
            ra, rb = json.loads(la), json.loads(lb)
            t1 = time.perf_counter()
            out.append(_loop_prompt(ra, rb))
            parse_s += t1 - t0
            loop_s += time.perf_counter() - t1
    return out, parse_s, loop_s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/ranking.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        fa, fb = make_files(d, args.prompts, args.samples, args.tokens, args.top_k)
        size_mb = (fa.stat().st_size + fb.stat().st_size) / 1e6
        # one-off conversion to the packed format (like sampling, not part of a ranking run)
        jsonl_load_s = convert_s = 0.0
        packed = []
        for f in (fa, fb):
            t0 = time.perf_counter()
            s = load_samples(f)
            t1 = time.perf_counter()
            packed.append(write_samples_packed(s, f.with_suffix(".npz")))
            jsonl_load_s += t1 - t0
            convert_s += time.perf_counter() - t1
            del s
        packed_mb = sum(p.stat().st_size for p in packed) / 1e6
        t0 = time.perf_counter()
        a, b = load_pair(*packed)
        t1 = time.perf_counter()
        ranking = rank_prompts(a, b, n_bootstrap=1000)
        t2 = time.perf_counter()
        base, parse_s, loop_s = loop_baseline(fa, fb)
    pairs = list(zip(ranking.prompts, base, strict=True))
    max_diff = max(abs(p.scores[m] - ref[m]) for p, ref in pairs for m in ref if "topk" not in m)
    # the loop computes the tail-bucket bounds; divscope the capped ones (never lower, up to
    # the documented float32 slack) and the JS upper bound besides
    for p, ref in pairs:
        for m in (m for m in ref if "topk" in m):
            assert p.scores[m] >= ref[m] - 1e-3, (m, p.scores[m], ref[m])
    ours = t2 - t0
    result = {
        "seconds_1000_prompts": ours * 1000 / args.prompts,
        "speedup_vs_loop": loop_s / ours,
        "speedup_vs_loop_with_its_json_parsing": (loop_s + parse_s) / ours,
        "max_abs_diff": max_diff,
        "divscope_load_packed_s": t1 - t0,
        "divscope_rank_s": t2 - t1,
        "divscope_load_jsonl_s": jsonl_load_s,
        "divscope_write_packed_s": convert_s,
        "loop_baseline_s": loop_s,
        "loop_baseline_json_parse_s": parse_s,
        "workload": {
            "prompts": args.prompts,
            "samples": args.samples,
            "tokens": args.tokens,
            "top_k": args.top_k,
            "jsonl_mb": round(size_mb, 1),
            "packed_mb": round(packed_mb, 1),
            "bootstrap": 1000,
            "metrics": "mc_kl, topk_kl_lb, topk_js_lb, topk_js_ub, legacy_aligned; both "
            "directions + mean (the loop: tail-bucket lower bounds, no upper bound)",
        },
        "machine": machine_info(),
    }
    assert max_diff < 1e-9, f"divscope and the loop disagree by {max_diff}"
    write_result(Path(args.out), result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
