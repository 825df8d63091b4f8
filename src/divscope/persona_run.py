"""The persona pipeline: generate, teacher-force under every persona, aggregate, check.

Work is one unit per generated response (generator persona g, question q): its JS/KL against
every persona and, once per question, the hidden states at each persona's last prompt
position. Units are cached by content under ``<cache>/personas/`` (model, prompt ids,
response ids, parameters), so a rerun is instant and an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from divscope.models import cache_dir, load_model, resolve_model
from divscope.personas import Persona, PromptRenderer, Question
from divscope.runmeta import atomic_write_json, atomic_write_text, run_metadata
from divscope.teacher_force import (
    PERSONA_BATCH,
    PromptKV,
    UnitScores,
    output_head,
    prompt_kv,
    teacher_force,
)

LN2 = math.log(2.0)
TWIN_SUFFIX = "__twin"
NOISE_FLOOR_JS = 1e-6  # nats: a persona vs its duplicate (another batch row): JS and both KLs


class PersonaCheckError(RuntimeError):
    """A consistency check of the persona matrices failed (details in ``checks``)."""

    def __init__(self, message: str, checks: dict[str, Any]):
        super().__init__(message)
        self.checks = checks


def default_layers(n_layers: int, k: int = 4) -> list[int]:
    """``k`` evenly spaced ``hidden_states`` indices ending at the last (``n_layers``)."""
    return sorted({round(n_layers * (i + 1) / k) for i in range(k)})


@dataclass
class PersonaResult:
    """Everything a persona run produces (also written to disk by :func:`write_outputs`)."""

    model: str
    personas: list[Persona]
    questions: list[Question]
    records: list[dict[str, Any]]
    matrices: dict[str, np.ndarray]
    per_prompt: list[dict[str, Any]]
    cosine: dict[str, Any]
    checks: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.personas]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def _model_key(name: str, path: str, dtype: str) -> str:
    p = Path(path)
    ident = {"name": name, "dtype": dtype}
    for f in ("config.json", "divscope.json"):
        if (p / f).exists():
            ident[f] = (p / f).read_text()
    return _hash(ident)


def aggregate(units: dict[tuple[int, int], UnitScores], n: int, n_q: int) -> dict[str, np.ndarray]:
    """Means over questions -> the N x N matrices (see :func:`run_personas`)."""
    js_g = np.zeros((n, n))
    kl_fwd = np.zeros((n, n))
    kl_rev = np.zeros((n, n))
    for (g, _q), u in units.items():
        js_g[g] += u.js[:n] / n_q
        kl_fwd[g] += u.kl_fwd[:n] / n_q
        kl_rev[g] += u.kl_rev[:n] / n_q
    matrices = {
        "js": 0.5 * (js_g + js_g.T),
        "js_by_generator": js_g,
        "kl_fwd": kl_fwd,
        "kl_rev": kl_rev,
        "kl_sym": 0.5 * (kl_fwd + kl_fwd.T),
        "kl_asym": kl_fwd - kl_fwd.T,
    }
    return matrices


def check_matrices(m: dict[str, np.ndarray], noise_floor: float | None) -> dict[str, Any]:
    """The consistency checks; each entry has the measured value and ``ok``."""
    js = m["js"]
    finite = all(np.isfinite(v).all() for v in m.values())
    checks = {
        "no_nan": {"ok": bool(finite)},
        "js_symmetric": {"max_abs_asymmetry": float(np.abs(js - js.T).max())},
        "js_in_0_ln2": {"min": float(js.min()), "max": float(js.max()), "ln2": LN2},
        "diagonals_zero": {
            "max_abs": float(
                max(
                    np.abs(np.diag(m[k])).max()
                    for k in ("js", "js_by_generator", "kl_fwd", "kl_rev")
                )
            )
        },
        "kl_nonnegative": {"min": float(min(m["kl_fwd"].min(), m["kl_rev"].min()))},
    }
    checks["js_symmetric"]["ok"] = checks["js_symmetric"]["max_abs_asymmetry"] <= 1e-12
    checks["js_in_0_ln2"]["ok"] = bool(js.min() >= -1e-9 and js.max() <= LN2 + 1e-9)
    checks["diagonals_zero"]["ok"] = checks["diagonals_zero"]["max_abs"] <= 1e-12
    checks["kl_nonnegative"]["ok"] = checks["kl_nonnegative"]["min"] >= -1e-6
    if noise_floor is not None:
        checks["noise_floor_twin"] = {
            "max_js": noise_floor,
            "threshold": NOISE_FLOOR_JS,
            "ok": noise_floor <= NOISE_FLOOR_JS,
        }
    checks["all_ok"] = all(v["ok"] for v in checks.values() if isinstance(v, dict))
    return checks


def cosine_matrices(hidden: np.ndarray, layers: list[int]) -> dict[str, Any]:
    """Raw and centred cosine between personas per layer.

    Args:
        hidden: ``(N, Q, n_layers, H)`` last-prompt-position hidden states.

    Returns:
        ``{"layers": [...], "raw": {layer: N x N}, "centred": {layer: N x N}}``; centred
        subtracts the mean over personas (after averaging over questions) first.
    """
    mean = hidden.astype(np.float64).mean(1)  # (N, L, H)
    out: dict[str, Any] = {
        "layers": layers,
        "raw": {},
        "centred": {},
        "note": "hidden_states[0] is the embedding output; index i is the "
        "output of block i, the last one after the final norm",
    }
    for k, layer in enumerate(layers):
        for kind, x in (("raw", mean[:, k]), ("centred", mean[:, k] - mean[:, k].mean(0))):
            unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
            out[kind][str(layer)] = (unit @ unit.T).tolist()
    return out


def run_personas(
    model_name: str,
    personas: list[Persona],
    questions: list[Question],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    layers: list[int] | None = None,
    backend: str = "hf",
    device: str = "cpu",
    dtype: str = "float32",
    gen_batch_size: int = 16,
    persona_batch: int | None = PERSONA_BATCH,
    noise_floor: bool = True,
    progress: bool = True,
    loaded: tuple[Any, Any] | None = None,
    unit_cache: str | Path | None = None,
) -> PersonaResult:
    """Run the persona pipeline (DESIGN.md, pipeline 2) and return its result.

    Matrices (means over questions; g = generating persona, o = other):
    ``kl_fwd[g][o] = KL(P_g||P_o)`` and ``kl_rev[g][o] = KL(P_o||P_g)`` on g's responses;
    ``js_by_generator[g][o]`` = JS on g's responses; ``js`` = its symmetrisation;
    ``kl_sym`` = mean of ``kl_fwd`` and its transpose; ``kl_asym = kl_fwd - kl_fwd.T``.

    ``loaded`` passes an already loaded ``(model, tokenizer)``; ``unit_cache`` overrides
    where units are cached (default ``<cache>/personas``).

    Raises:
        PersonaCheckError: A consistency check failed (the result is attached as
            ``error.checks``; outputs are still written by the caller if wanted).
        TemplateSeamError: The chat template breaks the prompt/response seam.
    """
    from tqdm.auto import tqdm

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = loaded or load_model(model_name, device=device, dtype=dtype)
    path = resolve_model(model_name) if loaded is None else model_name
    key = _model_key(model_name, path, dtype)
    timings["load_model"] = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers
    layers = layers or default_layers(n_layers)
    if any(not 0 <= x <= n_layers for x in layers):
        raise ValueError(f"layers must be in 0..{n_layers} (hidden_states indices)")
    renderer = PromptRenderer(tok)
    all_personas = list(personas)
    if noise_floor:
        twin = Persona(personas[0].name + TWIN_SUFFIX, personas[0].prompt)
        all_personas.append(twin)
    prompt_ids = [[renderer.prompt_ids(p, q) for q in questions] for p in all_personas]
    n, n_q = len(personas), len(questions)
    cache = (Path(unit_cache) if unit_cache else cache_dir() / "personas") / key
    cache.mkdir(parents=True, exist_ok=True)

    # 1. generation (cached per prompt)
    t1 = time.perf_counter()
    gen_params = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    gen_key = _hash(
        {
            "prompts": [prompt_ids[g][q] for g in range(n) for q in range(n_q)],
            **gen_params,
            "backend": backend,
        }
    )
    gen_file = cache / f"gen_{gen_key}.json"
    if gen_file.exists():
        responses = json.loads(gen_file.read_text())
    else:
        flat = [prompt_ids[g][q] for g in range(n) for q in range(n_q)]
        if backend == "hf":
            from divscope.generate import generate_hf

            with tqdm(total=len(flat), desc="generating", unit="resp", disable=not progress) as bar:
                out = generate_hf(
                    model, tok, flat, batch_size=gen_batch_size, progress=bar, **gen_params
                )
        elif backend == "vllm":
            from divscope.generate import generate_vllm

            out = generate_vllm(path, tok, flat, **gen_params)
        else:
            raise ValueError(f"backend must be 'hf' or 'vllm', not {backend!r}")
        responses = [out[g * n_q : (g + 1) * n_q] for g in range(n)]
        atomic_write_text(gen_file, json.dumps(responses), overwrite=True)
    timings["generate"] = time.perf_counter() - t1

    # 2. the seam, once per template
    from divscope.generate import stop_ids

    stops = stop_ids(tok, model)
    g0, q0 = next(
        (
            (g, q)
            for g in range(n)
            for q in range(n_q)
            if [t for t in responses[g][q] if t not in stops]
        ),
        (0, 0),
    )
    seam = renderer.check_seam(
        personas[g0], questions[q0], prompt_ids[g0][q0], responses[g0][q0], stops
    )

    # 3. teacher forcing, one cached unit per response
    t2 = time.perf_counter()
    head = output_head(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    units: dict[tuple[int, int], UnitScores] = {}
    hidden = np.zeros((len(all_personas), n_q, len(layers), model.config.hidden_size), np.float32)
    unit_params = {"layers": layers, "dtype": dtype, "twin": noise_floor}
    n_cached = 0
    tokens_scored = 0
    with tqdm(total=n * n_q, desc="teacher forcing", unit="resp", disable=not progress) as bar:
        for q in range(n_q):
            prompts_q = [prompt_ids[o][q] for o in range(len(all_personas))]
            kv: PromptKV | None = None  # the question's prompts, run once when first needed
            kv_built = False
            for g in range(n):
                resp = responses[g][q]
                want_hidden = g == 0
                ukey = _hash(
                    {
                        "prompts": prompts_q,
                        "response": resp,
                        "generator": g,
                        "hidden": want_hidden,
                        **unit_params,
                    }
                )
                f = cache / f"unit_{ukey}.npz"
                if f.exists():
                    with np.load(f, allow_pickle=False) as z:
                        u = UnitScores(
                            z["js"],
                            z["kl_fwd"],
                            z["kl_rev"],
                            int(z["n_tokens"]),
                            z["hidden"] if want_hidden else None,
                        )
                    n_cached += 1
                elif not resp:
                    raise RuntimeError(
                        f"persona {personas[g].name!r} generated nothing for "
                        f"question {questions[q].id!r}"
                    )
                else:
                    if not kv_built:
                        kv = prompt_kv(
                            model, prompts_q, layers=layers, persona_batch=persona_batch, pad_id=pad
                        )
                        kv_built = True
                    u = teacher_force(
                        model,
                        prompts_q,
                        resp,
                        g,
                        layers=layers if want_hidden else None,
                        persona_batch=persona_batch,
                        pad_id=pad,
                        head=head,
                        kv=kv,
                    )
                    arrays = {
                        "js": u.js,
                        "kl_fwd": u.kl_fwd,
                        "kl_rev": u.kl_rev,
                        "n_tokens": np.array(u.n_tokens),
                    }
                    if want_hidden:
                        arrays["hidden"] = u.hidden
                    tmp = f.with_suffix(".tmp.npz")
                    np.savez(tmp, **arrays)
                    tmp.replace(f)
                units[(g, q)] = u
                tokens_scored += u.n_tokens * len(all_personas)
                if want_hidden:
                    hidden[:, q] = u.hidden
                bar.update(1)
    timings["teacher_force"] = time.perf_counter() - t2

    # 4. aggregate, cosine, checks
    matrices = aggregate(units, n, n_q)
    # The twin has persona 0's prompt under another name, scored in another batch row: against
    # every generator it must give what persona 0 gives (JS and both KLs), to fp32 precision.
    twin_js = (
        max(
            max(abs(float(a[n] - a[0])) for a in (u.js, u.kl_fwd, u.kl_rev)) for u in units.values()
        )
        if noise_floor
        else None
    )
    checks = check_matrices(matrices, twin_js)
    if max(renderer.leading_bos(p) for row in prompt_ids for p in row) > 1:
        renderer.warnings.append("prompts start with more than one BOS token")
    checks["seam"] = seam
    cosine = cosine_matrices(hidden[:n], layers)
    per_prompt = [
        {
            "generator": personas[g].name,
            "other": personas[o].name,
            "question_id": questions[q].id,
            "js": float(u.js[o]),
            "kl_fwd": float(u.kl_fwd[o]),
            "kl_rev": float(u.kl_rev[o]),
            "n_tokens": u.n_tokens,
        }
        for (g, q), u in sorted(units.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        for o in range(n)
    ]
    records = [
        {
            "persona": personas[g].name,
            "question_id": questions[q].id,
            "question": questions[q].text,
            "prompt_token_ids": prompt_ids[g][q],
            "response_token_ids": responses[g][q],
            "response_text": tok.decode([t for t in responses[g][q] if t not in stops]),
        }
        for g in range(n)
        for q in range(n_q)
    ]
    timings["total"] = time.perf_counter() - t0
    meta = run_metadata(
        "personas",
        {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "layers": layers,
            "backend": backend,
            "device": device,
            "dtype": dtype,
            "n_personas": n,
            "n_questions": n_q,
            "persona_batch": persona_batch,
        },
        model=model_name,
        model_path=path,
        model_key=key,
        dtype=dtype,
        warnings=renderer.warnings,
        bos_token=tok.bos_token,
        bos_tokens_per_prompt=sorted({renderer.bos_count(p) for row in prompt_ids for p in row}),
        leading_bos_tokens=sorted({renderer.leading_bos(p) for row in prompt_ids for p in row}),
        tokens_scored=tokens_scored,
        units=len(units),
        units_from_cache=n_cached,
        timings_s=timings,
    )
    result = PersonaResult(
        model_name, personas, questions, records, matrices, per_prompt, cosine, checks, meta
    )
    if not checks["all_ok"]:
        bad = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]
        err = PersonaCheckError(f"persona matrices failed checks: {bad}", checks)
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def write_outputs(
    result: PersonaResult, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """Write generations.json, divergence_matrices.json, per_prompt.csv, cosine.json and
    metadata.json into ``out_dir`` (atomically; existing files only with ``overwrite``)."""
    out = Path(out_dir)
    names = result.names
    files = {
        "generations.json": {
            "model": result.model,
            "personas": {p.name: p.prompt for p in result.personas},
            "questions": {q.id: {"text": q.text, "category": q.category} for q in result.questions},
            "records": result.records,
        },
        "divergence_matrices.json": {
            "personas": names,
            **{k: v.tolist() for k, v in result.matrices.items()},
            "checks": result.checks,
            "metadata": result.metadata,
        },
        "cosine.json": {"personas": names, **result.cosine},
        "metadata.json": result.metadata,
    }
    if not overwrite:
        clash = [f for f in [*files, "per_prompt.csv"] if (out / f).exists()]
        if clash:
            raise FileExistsError(
                f"{out} already holds {clash}; choose a new --out or pass --overwrite"
            )
    written = {}
    for name, obj in files.items():
        written[name] = atomic_write_json(out / name, obj, overwrite=True)
    lines = ["generator,other,question_id,js,kl_fwd,kl_rev,n_tokens"]
    lines += [
        f"{r['generator']},{r['other']},{r['question_id']},{r['js']!r},{r['kl_fwd']!r},"
        f"{r['kl_rev']!r},{r['n_tokens']}"
        for r in result.per_prompt
    ]
    written["per_prompt.csv"] = atomic_write_text(
        out / "per_prompt.csv", "\n".join(lines) + "\n", overwrite=True
    )
    return written
