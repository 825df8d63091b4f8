"""The model-diff pipeline: load both conditions, generate, check the seams, score units,
aggregate, write. :func:`run_diff` reads as those steps.

Units (one prompt: both sides' samples teacher-forced under both models,
:func:`divscope.diff.score.score_prompt_pair`) are cached by content under
``<cache>/diff/<key>/`` (both conditions, prompt ids, response ids, top-k), so a rerun is
instant and an interrupted run resumes. Generations are cached per batch and settings. Units
and generation batches run on an executor (:mod:`divscope.execution`): in this process (the
default) or on Ray workers that each hold both models; the driver writes every result to the
cache and aggregates in prompt order, so the numbers are the same.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from divscope.bounded import ArrayFileError, read_unit_arrays, write_unit_arrays
from divscope.diff.aggregate import (
    CI_METHOD,
    METRICS,
    SUMMARY_NOTES,
    UNITS,
    prompt_score,
    rank,
    side_summary,
    what_changed,
)
from divscope.diff.conditions import (
    Condition,
    DiffInputError,
    condition_meta,
    load_condition,
    load_conditions,
)
from divscope.diff.inputs import check_inputs, check_loaded
from divscope.diff.layer_options import N_CAUSAL, causal_blocks_problem
from divscope.diff.layers_run import check_layers, layer_analysis
from divscope.diff.layers_summary import add_output_overlap
from divscope.diff.score import (
    SIDES,
    PairScores,
    PromptPair,
    SideScores,
    generate_side,
    score_pair_on,
)
from divscope.estimators.ranking import Ranking
from divscope.execution.executors import Executor, Pool, executor_for
from divscope.models.chat import PromptRenderer
from divscope.models.generate import GenChunk, gen_chunks, generate_cached, sampling_record
from divscope.models.load import cache_dir, library_bars_hidden, resolve_model
from divscope.runmeta import content_hash, run_metadata
from divscope.sampling.prompts import PromptItem, PromptsFileError, read_prompts_file

Responses = dict[str, list[list[list[int]]]]  # side -> [prompt][sample] -> token ids


@dataclass
class DiffSetup:
    """What every step needs: both models, their prompt ids for every prompt, the cache.

    ``models`` holds each side's loaded model, or only its
    :class:`divscope.models.load.ModelMeta` when the workers hold the models."""

    conditions: dict[str, Condition]
    models: dict[str, Any]
    tokenizers: dict[str, Any]
    renderers: dict[str, PromptRenderer]
    prompts: list[PromptItem]
    prompt_ids: dict[str, list[list[int]]]
    stops: dict[str, set[int]]
    key: str
    cache: Path
    same_tokenizer: bool = True
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)  # Condition.identity


@dataclass
class DiffResult:
    """Everything a diff produces (written by :func:`divscope.diff.outputs.write_outputs`)."""

    setup: DiffSetup
    responses: Responses
    units: dict[int, PairScores]
    ranking: Ranking
    summary: dict[str, Any]
    changed: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] | None = None  # sample files, when not exact
    layers: dict[str, Any] | None = None  # layers.json (``--layers``)


def read_prompts(
    path: str | Path, max_prompts: int | None = None, *, spread: bool = False
) -> list[PromptItem]:
    """Prompts from a JSONL file (``prompt``, optional ``category``) or a text file: all, the
    first ``max_prompts``, or with ``spread`` that many spread evenly over the file."""
    if not Path(path).exists():
        raise DiffInputError(f"{path}: no such prompts file. Fix: give a .jsonl or .txt file")
    try:
        items = read_prompts_file(Path(path))
    except PromptsFileError as e:
        raise DiffInputError(f"prompts file {e}") from e
    if not max_prompts or max_prompts >= len(items):
        return items
    if spread:
        return [items[i] for i in np.linspace(0, len(items) - 1, max_prompts).round().astype(int)]
    return items[:max_prompts]


def prepare(
    a: Condition,
    b: Condition,
    prompts: list[PromptItem],
    *,
    device: str,
    loaded: dict[str, tuple[Any, Any]] | None,
    unit_cache: str | Path | None,
    exact: bool = True,
    weights: bool = True,
    max_new_tokens: int | None = None,
) -> DiffSetup:
    """Load both conditions (unless ``loaded``; without their ``weights`` when workers hold
    them), compare their tokenizers (``exact``, or no ``weights``: they must be one), render
    prompts; with ``max_new_tokens``, check that every prompt and its response fit each
    model's context (:func:`divscope.diff.inputs.check_loaded`)."""
    from divscope.models.generate import stop_ids

    conds = {"a": a, "b": b}
    load = partial(load_condition, device=device) if weights else condition_meta
    pairs = {s: (loaded or {}).get(s) or load(c) for s, c in conds.items()}
    models = {s: m for s, (m, _) in pairs.items()}
    toks = {s: t for s, (_, t) in pairs.items()}
    same = toks["a"].get_vocab() == toks["b"].get_vocab()
    if not same and exact:
        raise DiffInputError(
            f"{a.label} and {b.label} have different tokenizers: exact per-position KL/JS "
            "needs one vocabulary. Fix: diff models that share a tokenizer, or leave --metric "
            "unset to rank by mc_kl per byte of text (sequence cross-scores)"
        )
    if not same and not weights:
        raise DiffInputError(
            f"{a.label} and {b.label} have different tokenizers: their text cross-scoring "
            "runs in one process only. Fix: drop --ray / --workers for this pair"
        )
    renderers = {s: PromptRenderer(t) for s, t in toks.items()}
    prompt_ids = {
        s: [renderers[s].prompt_ids(conds[s].system, p.prompt) for p in prompts] for s in SIDES
    }
    check_loaded(conds, models, prompts, prompt_ids, max_new_tokens, same)
    identities = {s: c.identity() for s, c in conds.items()}
    key = content_hash(identities)
    cache = (Path(unit_cache) if unit_cache else cache_dir() / "diff") / key
    cache.mkdir(parents=True, exist_ok=True)
    stops = {s: stop_ids(toks[s], models[s]) for s in SIDES}
    return DiffSetup(
        conds, models, toks, renderers, prompts, prompt_ids, stops, key, cache, same, identities
    )


def generate_samples(
    setup: DiffSetup,
    params: dict[str, Any],
    pool: Pool,
    *,
    backend: str,
    progress: bool,
    batch_size: int = 16,
    label: str = "in-process",
) -> Responses:
    """``samples`` responses per prompt from each side. With transformers both sides' batches
    are units on ``pool``, each cached on its own; vLLM runs here, one cache file per side."""
    from tqdm.auto import tqdm

    n_s = params["samples"]
    gen = {k: params[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")}
    flat = {s: [ids for ids in setup.prompt_ids[s] for _ in range(n_s)] for s in SIDES}
    if backend == "vllm":
        got = {s: _generate_vllm(setup, s, flat[s], gen, progress) for s in SIDES}
    else:
        chunks = [c for s in SIDES for c in gen_chunks(flat[s], batch_size, gen["seed"], s)]
        files = [
            setup.cache / f"genbatch_{c.side}_{content_hash(_chunk_ident(setup, c, gen))}.json"
            for c in chunks
        ]
        work = partial(generate_side, **{k: v for k, v in gen.items() if k != "seed"})
        total = sum(map(len, flat.values()))
        with tqdm(total=total, desc=f"generating [{label}]", unit="resp",
                  disable=not progress) as bar:  # fmt: skip
            both = generate_cached(pool, work, chunks, files, bar)
        got = {"a": both[: len(flat["a"])], "b": both[len(flat["a"]) :]}
    return {s: [got[s][i * n_s : (i + 1) * n_s] for i in range(len(setup.prompts))] for s in SIDES}


def _chunk_ident(setup: DiffSetup, chunk: GenChunk, gen: dict[str, Any]) -> dict[str, Any]:
    """What a generation batch's responses depend on (its cache key): prompts, model, the
    effective sampling settings, seed."""
    ident = setup.identities[chunk.side]
    sampling = sampling_record(gen["temperature"], gen["top_p"], "hf")
    return {"p": chunk.prompts, "c": ident, **gen, "seed": chunk.seed, "s": sampling}


def _generate_vllm(
    setup: DiffSetup, side: str, flat: list[list[int]], gen: dict[str, Any], progress: bool
) -> list[list[int]]:
    """One side's responses to ``flat`` prompt ids with vLLM (here, not on the workers),
    cached as one file."""
    from divscope.models.generate import generate_vllm, read_responses, write_responses

    cond = setup.conditions[side]
    sampling = sampling_record(gen["temperature"], gen["top_p"], "vllm")
    key = content_hash({"p": flat, "c": setup.identities[side], **gen, "s": sampling})
    f = setup.cache / f"gen_{side}_{key}.json"
    cached = read_responses(f, len(flat))
    if cached is not None:
        return cached
    if cond.adapter and not hasattr(setup.models[side], "save_pretrained"):
        raise DiffInputError(
            f"{cond.label}: vLLM loads an adapter as the merged model, which the driver makes "
            "from its own copy. Fix: drop --ray / --workers with --backend vllm and an adapter"
        )
    path = merged_dir(setup, side) if cond.adapter else resolve_model(cond.model)
    got = generate_vllm(
        path, setup.tokenizers[side], flat, **gen, dtype=cond.dtype,
        stops=setup.stops[side], progress=progress,
    )  # fmt: skip
    write_responses(f, got)
    return got


def merged_dir(setup: DiffSetup, side: str) -> str:
    """A directory vLLM can load for a side with an adapter: the merged model (the one the
    scores use), saved once under ``<cache>/merged/<condition hash>`` (atomically)."""
    import shutil
    import tempfile

    out = cache_dir() / "merged" / content_hash(setup.identities[side])
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            with library_bars_hidden():
                setup.models[side].save_pretrained(tmp)
            setup.tokenizers[side].save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(out)


def check_seams(setup: DiffSetup, responses: Responses) -> dict[str, Any]:
    """Each side's chat-template seam, checked on its first non-empty response."""
    seams = {}
    for side in SIDES:
        stops = setup.stops[side]
        i, r = next(
            ((i, r) for i, rs in enumerate(responses[side]) for r in rs if set(r) - stops),
            (0, responses[side][0][0]),
        )
        seams[side] = setup.renderers[side].check_seam(
            setup.conditions[side].system,
            setup.prompts[i].prompt,
            setup.prompt_ids[side][i],
            r,
            stops,
        )
    return seams


def score_units(
    setup: DiffSetup,
    responses: Responses,
    pool: Pool,
    *,
    top_k: int,
    progress: bool,
    label: str = "in-process",
) -> tuple[dict[int, PairScores], int]:
    """Every prompt's unit, through the cache: cached units are read here, the rest run on
    ``pool`` and are written as they arrive. Returns units in prompt order and how many were
    cached."""
    from tqdm.auto import tqdm

    found: dict[int, PairScores] = {}
    files: dict[int, Path] = {}
    todo: list[tuple[int, PromptPair]] = []
    for i in range(len(setup.prompts)):
        pair = PromptPair(
            setup.prompt_ids["a"][i], setup.prompt_ids["b"][i], {s: responses[s][i] for s in SIDES}
        )
        files[i] = setup.cache / f"unit_{content_hash({'pair': pair.__dict__, 'top_k': top_k})}.npz"
        unit = read_unit(files[i])
        if unit is None:
            todo.append((i, pair))
        else:
            found[i] = unit
    n_cached = len(found)
    desc = f"teacher forcing [{label}]"
    with tqdm(total=len(setup.prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        bar.update(n_cached)
        for i, unit in pool.map(partial(score_pair_on, top_k=top_k), todo):
            write_unit(files[i], unit)
            found[i] = unit
            bar.update(1)
    return {i: found[i] for i in range(len(setup.prompts))}, n_cached


_FIELDS = tuple(SideScores.__dataclass_fields__)
_KINDS = {"lengths": "iu", "agree": "b", "top_ids_a": "iu", "top_ids_b": "iu"}  # others: "f"
_UNIT_SPEC = {
    f"{s}.{k}": (_KINDS.get(k, "f"), (-1, -1) if k.startswith("top_") else (-1,))
    for s in SIDES
    for k in _FIELDS
} | {"changed": ("f", (3, -1)), "n_positions": ("iu", ())}


def write_unit(path: Path, unit: PairScores) -> None:
    """A unit as one ``.npz`` of plain arrays with its checksum, written atomically."""
    arrays = {f"{s}.{k}": getattr(unit.sides[s], k) for s in SIDES for k in _FIELDS}
    arrays["changed"] = unit.changed.astype(np.float32)
    arrays["n_positions"] = np.array(unit.n_positions)
    write_unit_arrays(path, path.stem, arrays)


def read_unit(path: Path) -> PairScores | None:
    """A cached unit, or None when there is none or it fails its checks (then recomputed).

    A failing unit (truncated, edited, renamed, malformed: :func:`read_unit_arrays`) is reported
    with a warning naming the file; the recomputed unit replaces it.
    """
    if not path.exists():
        return None
    try:
        z = read_unit_arrays(path, path.stem, _UNIT_SPEC)
    except ArrayFileError as e:
        warnings.warn(f"{e}; recomputing this unit", stacklevel=2)
        return None
    sides = {s: SideScores(*(z[f"{s}.{k}"] for k in _FIELDS)) for s in SIDES}
    return PairScores(sides, z["changed"].astype(np.float64), int(z["n_positions"]))


def build_ranking(setup: DiffSetup, units: dict[int, PairScores], *, metric: str) -> Ranking:
    """Per-prompt scores with CIs, ranked by ``metric`` (the ``divscope rank --json`` contract)."""
    prompts = [
        prompt_score(p.index, p.prompt, p.category, units[i], ci_level=0.95)
        for i, p in enumerate(setup.prompts)
    ]
    rank(prompts, metric)
    a, b = (setup.conditions[s].label for s in SIDES)
    notes = [
        "exact: full-vocabulary KL/JS at every position of each side's own samples, teacher-"
        "forced under both models (fp32); _ab on A's samples, _ba on B's",
        "mc_kl: mean of log P_A(x) - log P_B(x) over the sampled tokens of the same samples "
        "(the Monte Carlo view of kl; same weighting)",
    ]
    return Ranking(metric, [a, b], ["samples_a.jsonl", "samples_b.jsonl"], dict(UNITS),
                   list(METRICS), notes, prompts, 0, 0.95, CI_METHOD)  # fmt: skip


def run_diff(
    a: Condition,
    b: Condition,
    prompts: list[PromptItem],
    *,
    samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    metric: str | None = None,
    top_k: int = 20,
    n_bootstrap: int = 1000,
    backend: str = "hf",
    device: str = "cpu",
    progress: bool = True,
    loaded: dict[str, tuple[Any, Any]] | None = None,
    unit_cache: str | Path | None = None,
    ray: str | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    layers: bool = False,
    causal_blocks: int | str = N_CAUSAL,
) -> DiffResult:
    """Diff conditions ``a`` and ``b`` on ``prompts`` (DESIGN.md, pipeline 3).

    ``metric`` None ranks by ``kl``, or by ``mc_kl`` per byte when the two tokenizers differ
    (then no exact values exist: each side's responses are cross-scored as text, see
    :func:`cross_scored_records`); asking for an exact metric on two tokenizers is an error.
    ``ray`` (``"local"`` or a cluster address) and ``workers`` run generation and scoring on
    Ray workers that each load both conditions themselves
    (:func:`divscope.execution.make_executor`); ``executor`` passes one already made.
    ``layers`` adds the per-block decomposition of KL(A||B) (:mod:`divscope.diff.layers_run`;
    refused before any work for pairs it does not apply to); ``causal_blocks`` leading blocks
    (or ``"all"``) get its causal check.
    """
    if metric is not None and metric not in METRICS:
        raise DiffInputError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    params = {"samples": samples, "max_new_tokens": max_new_tokens}
    params |= {"temperature": temperature, "top_p": top_p, "seed": seed, "backend": backend}
    check_inputs({"a": a, "b": b}, prompts, params, backend)
    if layers:
        if problem := causal_blocks_problem(causal_blocks):
            raise DiffInputError(problem)
        causal_blocks = causal_blocks if causal_blocks == "all" else int(causal_blocks)
    t0 = time.perf_counter()
    with executor_for(executor, ray, workers, device) as ex:
        setup = prepare(
            a, b, prompts, device=device, loaded=loaded, unit_cache=unit_cache,
            exact=metric is not None and metric != "mc_kl", weights=not ex.remote,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        if layers:
            check_layers(setup)
        timings = {"load_models": time.perf_counter() - t0}
        local = None if ex.remote else {s: (setup.models[s], setup.tokenizers[s]) for s in SIDES}
        with ex.pool(partial(load_conditions, setup.conditions, device), local) as pool:
            responses = generate_samples(
                setup, params, pool, backend=backend, progress=progress, label=ex.label
            )
            timings["generate"] = time.perf_counter() - t0 - timings["load_models"]
            seams = check_seams(setup, responses)
            if not setup.same_tokenizer:
                return text_diff(setup, responses, params, seams, timings, n_bootstrap, seed, t0)
            t2 = time.perf_counter()
            units, n_cached = score_units(
                setup, responses, pool, top_k=top_k, progress=progress, label=ex.label
            )
            timings["teacher_force"] = time.perf_counter() - t2
            layer_doc = None
            if layers:
                layer_doc = layer_analysis(
                    setup, responses, pool, n_bootstrap=n_bootstrap, seed=seed,
                    progress=progress, label=ex.label, causal_blocks=causal_blocks,
                )  # fmt: skip
                timings["layers"] = time.perf_counter() - t2 - timings["teacher_force"]
        described = ex.describe()
    metric = metric or "kl"
    ranking = build_ranking(setup, units, metric=metric)
    ordered = [units[i] for i in range(len(prompts))]
    summary = {
        "notes": SUMMARY_NOTES,
        **{f"on_{s}_samples": side_summary(ordered, s) for s in SIDES},
    }
    decode = setup.tokenizers["a"].decode
    cats = {i: p.category for i, p in enumerate(prompts)}
    changed = what_changed(units, cats, lambda t: decode([t]))
    if layer_doc is not None:
        add_output_overlap(layer_doc, changed)
    timings["total"] = time.perf_counter() - t0
    params |= {"metric": metric, "top_k": top_k, "n_bootstrap": n_bootstrap}
    params["layers"] = layers
    if layers:
        params["causal_blocks"] = causal_blocks
    meta = diff_metadata(
        setup,
        {**params, "device": device, "n_prompts": len(prompts)},
        seams,
        timings,
        sampling=sampling_record(temperature, top_p, backend),
        warnings=[w for r in setup.renderers.values() for w in r.warnings],
        tokens_scored=sum(u.n_positions for u in units.values()),
        units=len(units),
        units_from_cache=n_cached,
        executor=described,
    )
    return DiffResult(setup, responses, units, ranking, summary, changed, meta, layers=layer_doc)


def diff_metadata(
    setup: DiffSetup,
    params: dict[str, Any],
    seams: dict[str, Any],
    timings: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """The run's metadata record: parameters, both conditions, the seams, timings."""
    return run_metadata(
        "diff",
        params,
        conditions={s: c.__dict__ for s, c in setup.conditions.items()},
        labels=[c.label for c in setup.conditions.values()],
        seams=seams,
        **extra,
        timings_s=timings,
    )


def cross_scored_records(
    setup: DiffSetup, responses: Responses, top_k: int = 20
) -> dict[str, list[dict[str, Any]]]:
    """Both sides' samples as divscope JSONL records, each response cross-scored by the other
    model in that model's own tokens (``aligned: false``): the sampler's cross-scoring,
    computed locally. For two tokenizers, where only sequence totals compare (per byte)."""
    from divscope.diff.samplefiles import columns, prompt_record, token_strings
    from divscope.diff.score import sequence_scores

    strings = {s: token_strings(setup.tokenizers[s]) for s in SIDES}
    labels = {s: setup.conditions[s].label for s in SIDES}
    out: dict[str, list[dict[str, Any]]] = {}
    for side in SIDES:
        other = "b" if side == "a" else "a"
        records = []
        for i, p in enumerate(setup.prompts):
            own_ids = [[t for t in r if t not in setup.stops[side]] for r in responses[side][i]]
            texts = [setup.tokenizers[side].decode(ids) for ids in own_ids]
            other_ids = [
                setup.tokenizers[other](t, add_special_tokens=False)["input_ids"] for t in texts
            ]
            own = sequence_scores(
                setup.models[side], setup.prompt_ids[side][i], own_ids, top_k=top_k
            )
            cross = sequence_scores(
                setup.models[other], setup.prompt_ids[other][i], other_ids, top_k=top_k
            )
            rows = []
            for r, text in enumerate(texts):
                rows.append(
                    {
                        "text": text,
                        "finish_reason": "stop"
                        if own_ids[r] != responses[side][i][r]
                        else "length",
                        "logprobs": columns(own_ids[r], *own[r], strings[side]),
                        "cross_scores": {
                            labels[other]: {
                                "aligned": False,
                                **columns(other_ids[r], *cross[r], strings[other]),
                            }
                        },
                    }
                )
            records.append(prompt_record(p, labels[side], rows))
        out[side] = records
    return out


def text_diff(
    setup: DiffSetup,
    responses: Responses,
    params: dict[str, Any],
    seams: dict[str, Any],
    timings: dict[str, float],
    n_bootstrap: int,
    seed: int,
    t0: float,
) -> DiffResult:
    """Two tokenizers: cross-score the texts and rank by ``mc_kl`` per byte with the sample
    files' estimator (:func:`divscope.estimators.ranking.rank_prompts`)."""
    from divscope.estimators.ranking import rank_prompts
    from divscope.samples.parse import parse_record
    from divscope.samples.read import checked_set
    from divscope.samples.records import TokenVocab

    t2 = time.perf_counter()
    records = cross_scored_records(setup, responses)
    timings["teacher_force"] = time.perf_counter() - t2
    vocab = TokenVocab()
    sets = [
        checked_set(
            Path(f"samples_{s}.jsonl"),
            [
                parse_record(r, i, Path(f"samples_{s}.jsonl"), vocab)
                for i, r in enumerate(records[s])
            ],
            vocab,
            "jsonl",
        )  # fmt: skip
        for s in SIDES
    ]
    ranking = rank_prompts(*sets, metric="mc_kl", n_bootstrap=n_bootstrap, seed=seed)
    ranking.notes.insert(
        0,
        f"{setup.conditions['a'].label} and {setup.conditions['b'].label} have different "
        "tokenizers: no exact per-position KL/JS exists; mc_kl compares each text's sequence "
        "log-probability under both models, per byte (the sampler's cross-scoring, computed "
        "locally)",
    )
    summary = {"notes": [ranking.notes[0]], "exact": False}
    timings["total"] = time.perf_counter() - t0
    params = {**params, "metric": "mc_kl", "n_prompts": len(setup.prompts)}
    sampling = sampling_record(params["temperature"], params["top_p"], params["backend"])
    meta = diff_metadata(setup, params, seams, timings, sampling=sampling, same_tokenizer=False)
    return DiffResult(setup, responses, {}, ranking, summary, {}, meta, records)
