"""Statistics for persona matrices: does JS predict leakage better than hidden-state cosine?

Inputs (loaders accept divscope's own files and the published reference's formats):

* persona matrices: our ``divergence_matrices.json`` (+ ``per_prompt.csv`` beside it) or the
  reference's ``{persona_names, js_matrix, kl_matrix, per_prompt_js}``;
* cosine measures: our ``cosine.json`` (raw and centred per layer), the reference's 11-persona
  ``{cosine_matrix_l<k>, persona_names}`` (centred), or its 111-persona
  ``cosine_leakage_correlation.json`` (raw cosine per source -> target pair and layer);
* leakage: directed pairs from a CSV ``source,target,rate[,found,total]`` or
  ``marker_eval_<source>.json`` files (``{target: {rate, found, total}}``).

Pairs are not independent (every persona appears in many pairs), so matrix-level association
gets a Mantel permutation test, correlations get bootstrap CIs (over pairs and, clustered,
over sources), and leakage correlations are also shown within each source.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as st

from divscope.bounded import json_int
from divscope.runmeta import read_csv


class AnalysisInputError(ValueError):
    """An input file cannot be used; names the file and the fix."""


# ---------------------------------------------------------------------------- inputs


@dataclass
class PersonaMatrices:
    """JS (symmetric) and directed KL between personas, plus per-question JS values."""

    names: list[str]
    js: np.ndarray
    kl: np.ndarray | None  # kl[a][b] = KL(P_a || P_b) on a's answers
    per_question: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def index(self, name: str) -> int:
        return self.names.index(name)


@dataclass
class CosineMeasure:
    """A cosine measure between personas: a full matrix, or values for directed pairs."""

    key: str  # "<variant>/layer_<k>"
    names: list[str] | None = None
    matrix: np.ndarray | None = None
    pairs: dict[tuple[str, str], float] | None = None

    def value(self, a: str, b: str) -> float | None:
        if self.matrix is not None and self.names and a in self.names and b in self.names:
            return float(self.matrix[self.names.index(a), self.names.index(b)])
        if self.pairs is not None:
            return self.pairs.get((a, b))
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), parse_int=json_int)
    except FileNotFoundError as e:
        raise AnalysisInputError(f"{path}: no such file. Fix: check the path") from e
    except ValueError as e:  # not JSON, not UTF-8, an integer of thousands of digits
        raise AnalysisInputError(f"{path}: not valid JSON ({e}). Fix: re-create it") from e


def _square(m: Any, n: int, path: Path, key: str) -> np.ndarray:
    a = np.asarray(m, dtype=float)
    if a.shape != (n, n):
        raise AnalysisInputError(
            f"{path}: {key} has shape {a.shape}, expected ({n}, {n}) for "
            f"{n} personas. Fix: use the matching files"
        )
    return a


def _add_per_prompt_rows(m: PersonaMatrices, rows: Any) -> None:
    """Per-question JS values from per-prompt rows (generator, other, question_id, js)."""
    for row in rows:
        if row["generator"] != row["other"]:
            entry = m.per_question.setdefault(row["question_id"], {"question": None, "values": []})
            entry["values"].append(float(row["js"]))


def load_matrices(path: str | Path) -> PersonaMatrices:
    """Read persona matrices (divscope's or the reference's format)."""
    path = Path(path)
    d = _read_json(path)
    if "personas" in d and "js" in d:  # divscope
        names = list(d["personas"])
        n = len(names)
        m = PersonaMatrices(
            names,
            _square(d["js"], n, path, "js"),
            _square(d["kl_fwd"], n, path, "kl_fwd") if "kl_fwd" in d else None,
            source="divscope",
        )
        csv_path = path.parent / "per_prompt.csv"
        if csv_path.exists():
            _add_per_prompt_rows(m, read_csv(csv_path))
        return m
    if "persona_names" in d and "js_matrix" in d:  # the published reference
        names = list(d["persona_names"])
        n = len(names)
        m = PersonaMatrices(
            names,
            _square(d["js_matrix"], n, path, "js_matrix"),
            _square(d["kl_matrix"], n, path, "kl_matrix") if "kl_matrix" in d else None,
            source="reference",
        )
        per_prompt = d.get("per_prompt_js") or {}
        if per_prompt:
            n_q = len(per_prompt) // n  # prompts are generator-major: index = g * n_q + q
            texts = _reference_questions(path.parent / "generations.json", n_q)
            for i, values in per_prompt.items():
                q = int(i) % n_q
                entry = m.per_question.setdefault(f"q{q:02d}", {"question": texts[q], "values": []})
                entry["values"].extend(float(v) for v in values.values())
        return m
    raise AnalysisInputError(
        f"{path}: not a persona matrices file (expected divscope's "
        "divergence_matrices.json or {persona_names, js_matrix}). "
        "Fix: pass the matrices file"
    )


def _reference_questions(path: Path, n_q: int) -> list[str | None]:
    if path.exists():
        g = _read_json(path)
        first = next(iter(g.values()), {}) if isinstance(g, dict) else {}
        qs = list(first.keys()) if isinstance(first, dict) else []
        if len(qs) == n_q:
            return qs
    return [None] * n_q


def load_cosine(path: str | Path) -> list[CosineMeasure]:
    """Read cosine measures from divscope's cosine.json or the reference's formats."""
    path = Path(path)
    d = _read_json(path)
    out: list[CosineMeasure] = []
    if "raw" in d and "centred" in d and "personas" in d:  # divscope
        names = list(d["personas"])
        for kind in ("raw", "centred"):
            for layer, m in d[kind].items():
                out.append(
                    CosineMeasure(
                        f"{kind}/layer_{layer}",
                        names,
                        _square(m, len(names), path, f"{kind}[{layer}]"),
                    )
                )
        return out
    mats = {k: v for k, v in d.items() if re.fullmatch(r"cosine_matrix_l\d+", k)}
    if mats and "persona_names" in d:  # reference 11-persona, centred
        names = list(d["persona_names"])
        for k, m in mats.items():
            out.append(
                CosineMeasure(
                    f"centred/layer_{k.rsplit('_l', 1)[1]}", names, _square(m, len(names), path, k)
                )
            )
        return out
    layers = {k: v for k, v in d.items() if re.fullmatch(r"layer\d+", k)}
    if layers and all("_per_source_detail" in v for v in layers.values()):  # reference 111
        for k, v in layers.items():
            pairs = {
                (src, e["persona"]): float(e["cosine_sim"])
                for src, entries in v["_per_source_detail"].items()
                for e in entries
            }
            out.append(CosineMeasure(f"raw111/layer_{k[len('layer') :]}", pairs=pairs))
        return out
    raise AnalysisInputError(
        f"{path}: no cosine matrices found (expected divscope's cosine.json,"
        " {cosine_matrix_l<k>, persona_names} or per-layer "
        "_per_source_detail). Fix: pass a cosine file"
    )


def check_cosine_fits(
    path: str | Path, measures: list[CosineMeasure], m: PersonaMatrices, leakage: bool
) -> list[CosineMeasure]:
    """``measures`` (read from ``path``) if the analysis can use them: a cosine matrix must
    cover every persona of the matrices; per-pair cosines are only used against leakage.

    Raises:
        AnalysisInputError: The file would be silently ignored otherwise; names why and the fix.
    """
    for c in measures:
        if c.matrix is not None and c.names is not None:
            missing = [n for n in m.names if n not in c.names]
            if missing:
                raise AnalysisInputError(
                    f"{path}: cosine {c.key} covers {len(m.names) - len(missing)} of the "
                    f"{len(m.names)} personas of the matrices (missing: {', '.join(missing[:5])})"
                    ". Fix: pass the cosine file of the same persona run"
                )
        elif not leakage:
            raise AnalysisInputError(
                f"{path}: holds cosine per directed (source, persona) pair, which only the "
                "leakage analysis uses. Fix: add --leakage, or pass a cosine matrix file "
                "(divscope's cosine.json or {cosine_matrix_l<k>, persona_names})"
            )
    return measures


def load_leakage(path: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """Directed leakage ``(source, target) -> {rate, found?, total?}``; self-pairs dropped.

    ``path``: a CSV ``source,target,rate[,found,total]``, a ``marker_eval_<source>.json``, or a
    directory of those (also ``<source>/marker_eval.json``).
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisInputError(f"{path}: no such file or directory. Fix: check the path")
    files: list[tuple[str, Path]] = []
    if path.is_dir():
        files += [
            (p.stem[len("marker_eval_") :], p) for p in sorted(path.glob("marker_eval_*.json"))
        ]
        files += [(p.parent.name, p) for p in sorted(path.glob("*/marker_eval.json"))]
        if not files:
            raise AnalysisInputError(
                f"{path}: no marker_eval_<source>.json files. Fix: pass a "
                "leakage CSV or a directory of marker_eval files"
            )
    elif path.suffix == ".csv":
        out = {}
        with path.open() as f:
            reader = csv.DictReader(f)
            missing = {"source", "target", "rate"} - set(reader.fieldnames or [])
            if missing:
                raise AnalysisInputError(
                    f"{path}: missing columns {sorted(missing)}. Fix: "
                    "write source,target,rate[,found,total]"
                )
            for i, row in enumerate(reader, start=2):
                try:
                    entry = {"rate": float(row["rate"])}
                    for k in ("found", "total"):
                        if row.get(k) not in (None, ""):
                            entry[k] = float(row[k])
                except ValueError as e:
                    raise AnalysisInputError(f"{path}: line {i}: {e}. Fix: numbers only") from e
                if row["source"] != row["target"]:
                    out[(row["source"], row["target"])] = entry
        return out
    elif path.name.startswith("marker_eval"):
        files.append((path.stem[len("marker_eval_") :] or path.parent.name, path))
    else:
        raise AnalysisInputError(f"{path}: not a leakage CSV or marker_eval file. Fix: pass one")
    out = {}
    for source, f in files:
        for target, v in _read_json(f).items():
            if target != source and isinstance(v, dict) and "rate" in v:
                out[(source, target)] = {
                    k: float(v[k]) for k in ("rate", "found", "total") if k in v
                }
    return out


# ---------------------------------------------------------------------------- statistics


def _upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(len(m), 1)]


def _corrs(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {
            "spearman_rho": None,
            "spearman_p": None,
            "pearson_r": None,
            "pearson_p": None,
            "n": len(x),
        }
    s, p = st.spearmanr(x, y), st.pearsonr(x, y)
    return {
        "spearman_rho": float(s.statistic),
        "spearman_p": float(s.pvalue),
        "pearson_r": float(p.statistic),
        "pearson_p": float(p.pvalue),
        "n": len(x),
    }


def discrimination(
    js: np.ndarray, std_threshold: float = 0.05, ratio_threshold: float = 3.0
) -> dict[str, Any]:
    """Spread of the upper-triangle JS values against pre-registered gates.

    ``std`` is the population standard deviation; the gate passes only if both
    ``std > std_threshold`` and ``max/min > ratio_threshold``.
    """
    v = _upper(np.asarray(js, dtype=float))
    out = {
        "n_pairs": len(v),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=0)),
        "min": float(v.min()),
        "max": float(v.max()),
        "ratio": float(v.max() / v.min()) if v.min() > 0 else math.inf,
        "thresholds": {"std": std_threshold, "ratio": ratio_threshold},
    }
    out["pass_std"] = out["std"] > std_threshold
    out["pass_ratio"] = out["ratio"] > ratio_threshold
    out["pass"] = out["pass_std"] and out["pass_ratio"]
    return out


def mantel(a: np.ndarray, b: np.ndarray, n_perm: int = 9999, seed: int = 0) -> dict[str, float]:
    """Mantel test of two symmetric matrices: Spearman of their upper triangles, with the
    p-value from permuting b's rows and columns jointly (two-sided, on |rho|).

    A joint permutation keeps the multiset of b's off-diagonal values, so ranks are computed
    once and permuted.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    iu = np.triu_indices(n, 1)
    ra = st.rankdata(a[iu])
    rb_full = np.zeros((n, n))
    rb_full[iu] = st.rankdata(b[iu])
    rb_full = rb_full + rb_full.T
    za = (ra - ra.mean()) / ra.std()
    obs = float(np.mean(za * _z(rb_full[iu])))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    rows = perms[:, iu[0]]
    cols = perms[:, iu[1]]
    rb = rb_full[rows, cols]  # (n_perm, n_pairs)
    stats_ = (za[None, :] * _z(rb)).mean(1)
    p = (1 + np.sum(np.abs(stats_) >= abs(obs) - 1e-12)) / (n_perm + 1)
    return {"rho": obs, "p": float(p), "n_permutations": n_perm}


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)


def dependent_correlations(r12: float, r13: float, r23: float, n: int) -> dict[str, Any]:
    """Test r12 = r13 for two correlations sharing variable 1, on the same n cases.

    * Meng, Rosenthal & Rubin (1992): ``Z = (z12 - z13) sqrt((n - 3) / (2 (1 - r23) h))`` with
      Fisher z, ``rbar^2 = (r12^2 + r13^2) / 2``, ``f = min(1, (1 - r23) / (2 (1 - rbar^2)))``,
      ``h = (1 - f rbar^2) / (1 - rbar^2)``.
    * Williams' t as given by Steiger (1980, eq. 7): ``t = (r12 - r13) sqrt((n - 1)(1 + r23) /
      (2 (n - 1)/(n - 3) |R| + rmean^2 (1 - r23)^3))``, ``df = n - 3``,
      ``|R| = 1 - r12^2 - r13^2 - r23^2 + 2 r12 r13 r23``.

    Two-sided p-values.
    """
    z12, z13 = math.atanh(r12), math.atanh(r13)
    rbar2 = (r12**2 + r13**2) / 2
    f = min(1.0, (1 - r23) / (2 * (1 - rbar2)))
    h = (1 - f * rbar2) / (1 - rbar2)
    z = (z12 - z13) * math.sqrt((n - 3) / (2 * (1 - r23) * h))
    det = 1 - r12**2 - r13**2 - r23**2 + 2 * r12 * r13 * r23
    rm = (r12 + r13) / 2
    t = (r12 - r13) * math.sqrt(
        (n - 1) * (1 + r23) / (2 * (n - 1) / (n - 3) * det + rm**2 * (1 - r23) ** 3)
    )
    return {
        "meng_rosenthal_rubin": {"z": z, "p": float(2 * st.norm.sf(abs(z)))},
        "williams_steiger": {"t": t, "df": n - 3, "p": float(2 * st.t.sf(abs(t), n - 3))},
    }


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(st.spearmanr(x, y).statistic)


def _boot_ci(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    v = values[np.isfinite(values)]
    if v.size < 0.9 * len(values) or v.size == 0:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


@dataclass
class _Resamples:
    """Bootstrap resamples of the directed pairs: plain (``idx``) and by source (``cl_idx``)."""

    idx: np.ndarray
    cl_idx: list[np.ndarray]
    sources: list[str]
    by_src: dict[str, np.ndarray]

    @classmethod
    def draw(cls, src: np.ndarray, n_boot: int, seed: int) -> _Resamples:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(src), (n_boot, len(src)))
        sources = sorted(set(src))
        by_src = {s: np.flatnonzero(src == s) for s in sources}
        cl = rng.integers(0, len(sources), (n_boot, len(sources)))
        cl_idx = [np.concatenate([by_src[sources[k]] for k in row]) for row in cl]
        return cls(idx, cl_idx, sources, by_src)

    def spearman_ci(self, x: np.ndarray, y: np.ndarray) -> dict[str, list[float] | None]:
        return {
            "pairs": _boot_ci(np.array([_spearman(x[i], y[i]) for i in self.idx])),
            "by_source": _boot_ci(np.array([_spearman(x[i], y[i]) for i in self.cl_idx])),
        }


def leakage_analysis(
    m: PersonaMatrices,
    cosines: list[CosineMeasure],
    leakage: dict[tuple[str, str], dict[str, float]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """JS (and KL in both directions) vs leakage on the directed pairs with data, and each
    cosine vs leakage on the same pairs, with the dependent-correlation comparison."""
    pairs = [(s, t) for (s, t) in sorted(leakage) if s in m.names and t in m.names]
    if len(pairs) < 4:
        raise AnalysisInputError(
            f"only {len(pairs)} leakage pairs match the matrices' personas "
            f"{m.names}. Fix: check persona names in both files"
        )
    leak = np.array([leakage[p]["rate"] for p in pairs])
    js = np.array([m.js[m.index(s), m.index(t)] for s, t in pairs])
    rs = _Resamples.draw(np.array([s for s, _ in pairs]), n_boot, seed)
    out: dict[str, Any] = {"n_pairs": len(pairs), "n_sources": len(rs.sources)}
    out["sources"] = rs.sources
    c = _corrs(js, leak)
    out["js_spearman_rho"], out["js_spearman_p"] = c["spearman_rho"], c["spearman_p"]
    out["js_pearson_r"], out["js_pearson_p"] = c["pearson_r"], c["pearson_p"]
    out["js_spearman_ci"] = rs.spearman_ci(js, leak)
    if m.kl is not None:
        kl_f = np.array([m.kl[m.index(s), m.index(t)] for s, t in pairs])
        kl_r = np.array([m.kl[m.index(t), m.index(s)] for s, t in pairs])
        out["kl_source_to_target"] = _corrs(kl_f, leak)
        out["kl_target_to_source"] = _corrs(kl_r, leak)
    out["cosine"] = {}
    within: dict[str, Any] = {"js": {}}
    for s in rs.sources:
        i = rs.by_src[s]
        within["js"][s] = _nan_none(_spearman(js[i], leak[i]))
    for cm in cosines:
        vals = [cm.value(s, t) for s, t in pairs]
        if any(v is None for v in vals):
            continue
        cos = np.array(vals, dtype=float)
        out["cosine"][cm.key] = _cosine_vs_js(cos, js, leak, c["spearman_rho"], rs)
        within[cm.key] = {
            s: _nan_none(_spearman(cos[rs.by_src[s]], leak[rs.by_src[s]])) for s in rs.sources
        }
    out["within_source"] = _within_source(within)
    out["directed_pairs"] = [
        {"source": s, "target": t, "leakage_rate": float(r), "js": float(j)}
        for (s, t), r, j in zip(pairs, leak, js, strict=True)
    ]
    return out


def _cosine_vs_js(
    cos: np.ndarray, js: np.ndarray, leak: np.ndarray, js_rho: float | None, rs: _Resamples
) -> dict[str, Any]:
    """One cosine measure against leakage, and compared with -JS (dependent correlations)."""
    cc = _corrs(cos, leak)
    entry: dict[str, Any] = {
        "spearman_rho": cc["spearman_rho"],
        "spearman_p": cc["spearman_p"],
        "pearson_r": cc["pearson_r"],
        "spearman_ci": rs.spearman_ci(cos, leak),
    }
    if cc["spearman_rho"] is None or js_rho is None:
        return entry
    # JS is a distance and cosine a similarity: compare rho(-JS, leak) with
    # rho(cos, leak); the two share the leakage variable and the same pairs.
    r12, r13 = -js_rho, cc["spearman_rho"]
    r23 = -_spearman(js, cos)
    if len(js) <= 3 or not all(abs(r) < 1 for r in (r12, r13, r23)):
        entry["comparison_note"] = (
            f"no comparison: with {len(js)} pairs and correlations of "
            f"{r12:.3g}, {r13:.3g} (and {r23:.3g} between -JS and cosine) the test is undefined"
        )
        return entry
    test = dependent_correlations(r12, r13, r23, len(js))
    diff = np.array([-_spearman(js[i], leak[i]) - _spearman(cos[i], leak[i]) for i in rs.idx])
    diff_cl = np.array([-_spearman(js[i], leak[i]) - _spearman(cos[i], leak[i]) for i in rs.cl_idx])
    entry["comparison"] = {
        "method": "Meng-Rosenthal-Rubin (1992) z for dependent correlations sharing "
        "leakage, on Spearman rho(-JS, leakage) vs rho(cosine, leakage)",
        "statistic": test["meng_rosenthal_rubin"]["z"],
        "p": test["meng_rosenthal_rubin"]["p"],
        "williams_steiger": test["williams_steiger"],
        "rho_neg_js": r12,
        "rho_cosine": r13,
        "rho_neg_js_cosine": r23,
        "difference": r12 - r13,
        "difference_ci": {"pairs": _boot_ci(diff), "by_source": _boot_ci(diff_cl)},
    }
    return entry


def _within_source(within: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """Spearman rho inside each source persona, per measure, and its mean over sources."""
    return {
        "note": "Spearman rho inside each source persona (null where leakage is constant); "
        "pooled pairs cluster by source",
        **within,
        "mean_rho": {
            k: _nan_none(
                float(np.nanmean([x for x in v.values() if x is not None]))
                if any(x is not None for x in v.values())
                else float("nan")
            )
            for k, v in within.items()
        },
    }


def _nan_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def redundancy(
    m: PersonaMatrices,
    cosines: list[CosineMeasure],
    *,
    threshold: float = 0.8,
    n_perm: int = 9999,
    seed: int = 0,
) -> dict[str, Any]:
    """JS vs each full cosine matrix over the unique pairs; redundant when |rho| > threshold."""
    out: dict[str, Any] = {}
    for cm in cosines:
        if cm.matrix is None:
            continue
        order = [cm.names.index(n) for n in m.names] if set(m.names) <= set(cm.names) else None
        if order is None:
            continue
        cos = cm.matrix[np.ix_(order, order)]
        c = _corrs(_upper(m.js), _upper(cos))
        mt = mantel(m.js, cos, n_perm, seed)
        out[cm.key] = {
            **{k: c[k] for k in ("spearman_rho", "spearman_p", "pearson_r", "pearson_p")},
            "n_pairs": c["n"],
            "mantel_p": mt["p"],
            "mantel_permutations": n_perm,
            "redundant": c["spearman_rho"] is not None and abs(c["spearman_rho"]) > threshold,
            "threshold": threshold,
        }
    return out


def kl_asymmetry(
    m: PersonaMatrices, leakage: dict[tuple[str, str], dict[str, float]]
) -> dict[str, Any]:
    """KL asymmetry vs leakage asymmetry on persona pairs with leakage both ways.

    Signed: ``kl[a][b] - kl[b][a]`` vs ``leak(a->b) - leak(b->a)``; also the absolute values
    (the published analysis used those).
    """
    if m.kl is None:
        return {"n_pairs": 0, "note": "no KL matrix in the input"}
    pairs = [
        (a, b)
        for (a, b) in sorted(leakage)
        if a < b and (b, a) in leakage and a in m.names and b in m.names
    ]
    rows = []
    for a, b in pairs:
        ia, ib = m.index(a), m.index(b)
        rows.append(
            {
                "a": a,
                "b": b,
                "kl_a_b": float(m.kl[ia, ib]),
                "kl_b_a": float(m.kl[ib, ia]),
                "kl_asym": float(m.kl[ia, ib] - m.kl[ib, ia]),
                "leak_a_b": leakage[(a, b)]["rate"],
                "leak_b_a": leakage[(b, a)]["rate"],
                "leak_asym": leakage[(a, b)]["rate"] - leakage[(b, a)]["rate"],
            }
        )
    x = np.array([r["kl_asym"] for r in rows])
    y = np.array([r["leak_asym"] for r in rows])
    out: dict[str, Any] = {"n_pairs": len(rows), "pairs": rows}
    if len(rows) >= 3:
        out["signed"] = _corrs(x, y)
        out["absolute"] = _corrs(np.abs(x), np.abs(y))
    return out


def per_question(m: PersonaMatrices) -> dict[str, Any]:
    """Which questions separate personas most: mean, std and coefficient of variation of the
    JS values over pairs (and generators), keyed by question id, highest CV first."""
    rows = {}
    for key, e in m.per_question.items():
        v = np.asarray(e["values"], dtype=float)
        rows[key] = {
            "question": e.get("question"),
            "n_values": len(v),
            "js_mean": float(v.mean()),
            "js_std": float(v.std(ddof=0)),
            "js_min": float(v.min()),
            "js_max": float(v.max()),
            "cv": float(v.std(ddof=0) / v.mean()) if v.mean() > 0 else None,
        }
    order = sorted(rows, key=lambda k: -(rows[k]["cv"] or 0))
    return {"questions": {k: rows[k] for k in order}, "order_by_cv": order}


def analyze(
    matrices: PersonaMatrices,
    cosines: list[CosineMeasure],
    leakage: dict[tuple[str, str], dict[str, float]] | None = None,
    *,
    std_threshold: float = 0.05,
    ratio_threshold: float = 3.0,
    redundancy_threshold: float = 0.8,
    n_perm: int = 9999,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """All analyses, as the ``divscope analyze`` JSON document."""
    out: dict[str, Any] = {
        "personas": matrices.names,
        "discrimination": discrimination(matrices.js, std_threshold, ratio_threshold),
        "redundancy": redundancy(
            matrices, cosines, threshold=redundancy_threshold, n_perm=n_perm, seed=seed
        ),
        "per_question": per_question(matrices),
    }
    if leakage:
        out["leakage"] = leakage_analysis(matrices, cosines, leakage, n_boot=n_boot, seed=seed)
        out["kl_asymmetry"] = kl_asymmetry(matrices, leakage)
    out["warnings"] = sample_warnings(out, n_perm)
    return out


MIN_PERSONAS = 6  # below: 15 pairs or fewer, Mantel p bounded away from 0
MIN_LEAKAGE_PAIRS = 10


def sample_warnings(result: dict[str, Any], n_perm: int) -> list[str]:
    """Where the sample is too small for the statistics to mean much, and why."""
    out = []
    n = len(result["personas"])
    pairs = n * (n - 1) // 2
    if n < MIN_PERSONAS:
        orders = math.factorial(n)
        floor = max(1 / orders, 1 / (n_perm + 1))
        out.append(
            f"only {n} personas ({pairs} pairs): Spearman rho over {pairs} pairs takes few "
            f"values, and with {orders} orderings of the personas no Mantel p can fall below "
            f"about {floor:.3g}; read rho and p as descriptive (at least {MIN_PERSONAS} "
            "personas for a test)"
        )
    lk = result.get("leakage")
    if lk and lk["n_pairs"] < MIN_LEAKAGE_PAIRS:
        out.append(
            f"only {lk['n_pairs']} directed leakage pairs: the leakage correlations and their "
            f"comparison are weak evidence (at least {MIN_LEAKAGE_PAIRS} pairs for a test)"
        )
    ka = result.get("kl_asymmetry")
    if ka is not None and 0 < ka.get("n_pairs", 0) < 5:
        out.append(
            f"only {ka['n_pairs']} persona pairs with leakage both ways: the KL asymmetry "
            "correlation is not computed below 3 and is weak below 5"
        )
    return out


def matrices_from_result(result: Any) -> PersonaMatrices:
    """PersonaMatrices from an in-memory :class:`divscope.personas.pipeline.PersonaResult`, with the
    same per-question keys (question ids) as :func:`load_matrices` on the written files."""
    m = PersonaMatrices(
        list(result.names),
        np.asarray(result.matrices["js"]),
        np.asarray(result.matrices["kl_fwd"]),
        source="divscope",
    )
    _add_per_prompt_rows(m, result.per_prompt)
    return m


def cosine_from_result(result: Any) -> list[CosineMeasure]:
    """Cosine measures from an in-memory PersonaResult (as :func:`load_cosine` reads them)."""
    names = list(result.names)
    return [
        CosineMeasure(f"{kind}/layer_{layer}", names, np.asarray(m))
        for kind in ("raw", "centred")
        for layer, m in result.cosine[kind].items()
    ]
