"""The persona pipeline: generate, check the seam, score units, aggregate, check, write.

:func:`run_personas` reads as those steps; each is a function below with its inputs and
outputs in its signature. The unit of work (one question's responses under every persona) is
:func:`divscope.personas.units.score_question`; units are cached by content under
``<cache>/personas/<model key>/`` (model, prompt ids, response ids, parameters), so a rerun
neither generates nor teacher-forces again and an interrupted run resumes. Units run on an
executor (:mod:`divscope.execution`): in this process (the default) or on Ray workers that each
hold the model; the driver writes every result to the cache and aggregates in question order,
so the numbers are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from divscope.execution.executors import Executor, Pool, executor_for
from divscope.models.chat import PromptRenderer
from divscope.models.checks import context_limit, context_problem, generation_problem
from divscope.models.generate import gen_chunks, generate_cached, sampling_record
from divscope.models.load import (
    cache_dir,
    load_meta,
    load_model,
    model_identity,
    resolve_model,
)
from divscope.models.teacher_force import PERSONA_BATCH, UnitScores
from divscope.personas.data import Persona, PersonaDataError, Question
from divscope.personas.matrices import aggregate, check_matrices, cosine_matrices, twin_deviation
from divscope.personas.units import (
    QuestionUnit,
    Scorer,
    UnitCache,
    generate_on,
    load_scorer,
    score_on,
)
from divscope.runmeta import (
    atomic_write_json,
    atomic_write_text,
    content_hash,
    csv_text,
    run_metadata,
)

TWIN_SUFFIX = "__twin"

Responses = list[list[list[int]]]  # [generator][question] -> response token ids


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
    cache: Path | None = None  # this model's unit cache (explanations are cached there too)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.personas]


@dataclass
class Setup:
    """What every step needs: the model, its prompts for every (persona, question), the cache.

    ``model`` is the loaded model, or only its :class:`divscope.models.load.ModelMeta` when
    the workers hold the model (a remote executor). ``all_personas`` is ``personas`` plus the
    noise-floor twin when there is one; ``prompt_ids`` is indexed ``[persona][question]`` over
    ``all_personas``.
    """

    model: Any
    tokenizer: Any
    model_name: str
    model_path: str
    model_key: str
    dtype: str
    layers: list[int]
    renderer: PromptRenderer
    personas: list[Persona]
    questions: list[Question]
    all_personas: list[Persona]
    prompt_ids: list[list[list[int]]]
    stops: set[int]
    cache: Path

    @property
    def noise_floor(self) -> bool:
        """Whether a twin of persona 0 is scored (the noise-floor check)."""
        return len(self.all_personas) > len(self.personas)


def model_key(name: str, dtype: str) -> str:
    """Content address of a model: its name, dtype, config and weight files
    (:func:`divscope.models.load.model_identity`)."""
    return content_hash({**model_identity(name), "dtype": dtype})


def prepare(
    model_name: str,
    personas: list[Persona],
    questions: list[Question],
    *,
    loaded: tuple[Any, Any] | None,
    device: str,
    dtype: str,
    layers: list[int] | None,
    noise_floor: bool,
    unit_cache: str | Path | None,
    weights: bool = True,
    max_new_tokens: int | None = None,
) -> Setup:
    """Load the model (unless ``loaded``; without its ``weights`` when workers hold it), render
    every prompt (with ``max_new_tokens``: each must fit the model's context with its answer),
    open the unit cache."""
    from divscope.models.generate import stop_ids

    if loaded is None:
        loaded = load_model(model_name, device=device, dtype=dtype) if weights else None
    model, tok = loaded or load_meta(model_name)
    path = resolve_model(model_name)  # a packaged name is its converted directory (vLLM)
    key = model_key(model_name, dtype)
    n_layers = model.config.num_hidden_layers
    layers = layers or default_layers(n_layers)
    if any(not 0 <= x <= n_layers for x in layers):
        fix = default_layers(n_layers)
        raise PersonaDataError(
            f"layers {layers}: hidden_states indices of {model_name} are 0..{n_layers} (0 the "
            f"embeddings, {n_layers} the last block). Fix: e.g. --layers "
            f"{','.join(map(str, fix))} (persona_js_demo: LAYERS = {fix})"
        )
    renderer = PromptRenderer(tok)
    all_personas = list(personas)
    if noise_floor:
        all_personas.append(Persona(personas[0].name + TWIN_SUFFIX, personas[0].prompt))
    prompt_ids = [[renderer.prompt_ids(p.prompt, q.text) for q in questions] for p in all_personas]
    if max_new_tokens is not None:
        named = [
            (f"question {q.id} under persona {p.name}", prompt_ids[g][k])
            for g, p in enumerate(all_personas)
            for k, q in enumerate(questions)
        ]
        if problem := context_problem(named, max_new_tokens, context_limit(model), model_name):
            raise PersonaDataError(problem)
    cache = (Path(unit_cache) if unit_cache else cache_dir() / "personas") / key
    cache.mkdir(parents=True, exist_ok=True)
    return Setup(
        model=model,
        tokenizer=tok,
        model_name=model_name,
        model_path=path,
        model_key=key,
        dtype=dtype,
        layers=layers,
        renderer=renderer,
        personas=list(personas),
        questions=list(questions),
        all_personas=all_personas,
        prompt_ids=prompt_ids,
        stops=stop_ids(tok, model),
        cache=cache,
    )


def generate_responses(
    setup: Setup,
    gen_params: dict[str, Any],
    pool: Pool,
    *,
    backend: str,
    gen_batch_size: int,
    progress: bool,
    label: str = "in-process",
) -> Responses:
    """Each persona answers each question: ``[g][q]`` -> ids. With transformers the batches
    are units on ``pool``, each cached on its own; vLLM runs here and caches the whole set."""
    from tqdm.auto import tqdm

    n, n_q = len(setup.personas), len(setup.questions)
    flat = [setup.prompt_ids[g][q] for g in range(n) for q in range(n_q)]
    sampling = sampling_record(gen_params["temperature"], gen_params["top_p"], backend)
    if backend == "hf":
        chunks = gen_chunks(flat, gen_batch_size, gen_params["seed"])
        keys = [
            content_hash({"prompts": c.prompts, **gen_params, "seed": c.seed, "s": sampling})
            for c in chunks
        ]
        files = [setup.cache / f"genbatch_{k}.json" for k in keys]
        work = partial(generate_on, **{k: v for k, v in gen_params.items() if k != "seed"})
        desc = f"generating [{label}]"
        with tqdm(total=len(flat), desc=desc, unit="resp", disable=not progress) as bar:
            out = generate_cached(pool, work, chunks, files, bar)
    elif backend == "vllm":
        from divscope.models.generate import generate_vllm, read_responses, write_responses

        gen_file = (
            setup.cache
            / f"genvllm_{content_hash({'prompts': flat, **gen_params, 's': sampling})}.json"
        )
        out = read_responses(gen_file, len(flat))
        if out is None:
            out = generate_vllm(
                setup.model_path, setup.tokenizer, flat, **gen_params, dtype=setup.dtype,
                stops=setup.stops, progress=progress,
            )  # fmt: skip
            write_responses(gen_file, out)
    else:
        raise ValueError(f"backend must be 'hf' or 'vllm', not {backend!r}")
    return [out[g * n_q : (g + 1) * n_q] for g in range(n)]


def check_seam(setup: Setup, responses: Responses) -> dict[str, Any]:
    """The chat-template seam, checked once on the first non-empty response."""
    personas, questions, stops = setup.personas, setup.questions, setup.stops
    n, n_q = len(personas), len(questions)
    g0, q0 = next(
        (
            (g, q)
            for g in range(n)
            for q in range(n_q)
            if [t for t in responses[g][q] if t not in stops]
        ),
        (0, 0),
    )
    return setup.renderer.check_seam(
        personas[g0].prompt, questions[q0].text, setup.prompt_ids[g0][q0], responses[g0][q0], stops
    )


def score_units(
    setup: Setup,
    responses: Responses,
    pool: Pool,
    *,
    persona_batch: int | None,
    progress: bool,
    label: str = "in-process",
    responses_per_unit: int | None = None,
) -> tuple[dict[tuple[int, int], UnitScores], int]:
    """Score every response under every persona through the cache: cached responses are read
    here, the rest run on ``pool`` (a unit: one question's uncached responses, or blocks of
    ``responses_per_unit`` of them) and are written as they arrive.

    Returns:
        (generator, question) -> :class:`UnitScores` in (question, generator) order, and how
        many came from the cache.
    """
    from tqdm.auto import tqdm

    personas, questions = setup.personas, setup.questions
    n, n_q = len(personas), len(questions)
    params = {"layers": setup.layers, "dtype": setup.dtype, "twin": setup.noise_floor}
    cache = UnitCache(setup.cache, params)
    found: dict[tuple[int, int], UnitScores] = {}
    files: dict[tuple[int, int], Path] = {}
    todo: list[tuple[int, QuestionUnit]] = []
    for q in range(n_q):
        prompts = [setup.prompt_ids[o][q] for o in range(len(setup.all_personas))]
        missing = {}
        for g in range(n):
            files[(g, q)] = cache.path(prompts, responses[g][q], g, g == 0)
            u = cache.read(files[(g, q)], hidden=g == 0, n_personas=len(prompts))
            if u is not None:
                found[(g, q)] = u
            elif not responses[g][q]:
                raise RuntimeError(
                    f"persona {personas[g].name!r} generated nothing for "
                    f"question {questions[q].id!r}"
                )
            else:
                missing[g] = responses[g][q]
        gens = sorted(missing)
        size = responses_per_unit or len(gens) or 1
        for b in range(0, len(gens), size):
            block = {g: missing[g] for g in gens[b : b + size]}
            todo.append(((q, b), QuestionUnit(prompts, block, 0, setup.layers)))
    n_cached = len(found)
    desc = f"teacher forcing [{label}]"
    with tqdm(total=n * n_q, desc=desc, unit="resp", disable=not progress) as bar:
        bar.update(n_cached)
        work = partial(score_on, persona_batch=persona_batch)
        for (q, _), scored in pool.map(work, todo):
            for g, u in scored.items():
                cache.write(files[(g, q)], u)
                found[(g, q)] = u
            bar.update(len(scored))
    return {(g, q): found[(g, q)] for q in range(n_q) for g in range(n)}, n_cached


def per_prompt_rows(setup: Setup, units: dict[tuple[int, int], UnitScores]) -> list[dict[str, Any]]:
    """One row per (generator, other, question), question-major."""
    personas, questions = setup.personas, setup.questions
    n = len(personas)
    return [
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


def generation_records(setup: Setup, responses: Responses) -> list[dict[str, Any]]:
    """One record per (persona, question): prompt and response ids and the response text."""
    decode, stops = setup.tokenizer.decode, setup.stops
    return [
        {
            "persona": p.name,
            "question_id": q.id,
            "question": q.text,
            "prompt_token_ids": setup.prompt_ids[g][i],
            "response_token_ids": responses[g][i],
            "response_text": decode([t for t in responses[g][i] if t not in stops]),
        }
        for g, p in enumerate(setup.personas)
        for i, q in enumerate(setup.questions)
    ]


def hidden_states(setup: Setup, units: dict[tuple[int, int], UnitScores]) -> np.ndarray:
    """``(N, Q, n_layers, H)`` hidden states at each persona's last prompt position."""
    n, n_q = len(setup.personas), len(setup.questions)
    h = setup.model.config.hidden_size
    hidden = np.zeros((len(setup.all_personas), n_q, len(setup.layers), h), np.float32)
    for q in range(n_q):
        hidden[:, q] = units[(0, q)].hidden
    return hidden[:n]


def check(
    setup: Setup,
    matrices: dict[str, np.ndarray],
    units: dict[tuple[int, int], UnitScores],
    seam: dict[str, Any],
) -> dict[str, Any]:
    """The consistency checks of the matrices, the noise floor, the seam and the BOS count."""
    n = len(setup.personas)
    checks = check_matrices(matrices, twin_deviation(units, n) if setup.noise_floor else None)
    renderer = setup.renderer
    if max(renderer.leading_bos(p) for row in setup.prompt_ids for p in row) > 1:
        renderer.warnings.append("prompts start with more than one BOS token")
    checks["seam"] = seam
    return checks


def run_metadata_record(
    setup: Setup,
    params: dict[str, Any],
    units: dict[tuple[int, int], UnitScores],
    n_cached: int,
    timings: dict[str, float],
    executor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's metadata: parameters, model identity, template warnings, counts, executor,
    timings."""
    renderer, ids = setup.renderer, [p for row in setup.prompt_ids for p in row]
    return run_metadata(
        "personas",
        params,
        model=setup.model_name,
        model_path=setup.model_path,
        model_key=setup.model_key,
        dtype=params["dtype"],
        sampling=sampling_record(params["temperature"], params["top_p"], params["backend"]),
        warnings=renderer.warnings,
        bos_token=setup.tokenizer.bos_token,
        bos_tokens_per_prompt=sorted({renderer.bos_count(p) for p in ids}),
        leading_bos_tokens=sorted({renderer.leading_bos(p) for p in ids}),
        tokens_scored=sum(u.n_tokens for u in units.values()) * len(setup.all_personas),
        units=len(units),
        units_from_cache=n_cached,
        executor=executor or {"kind": "in-process", "workers": 1},
        timings_s=timings,
    )


def check_generation(
    n_personas: int, n_questions: int, gen: dict[str, Any], backend: str, *, noise_floor: bool
) -> None:
    """Refuse (:class:`PersonaDataError`) sampling parameters ``gen`` (``max_new_tokens``,
    ``temperature``, ``top_p``, ``seed``) a run cannot use, or a backend that is not
    installed: before any model loads."""
    if problem := generation_problem(gen, (n_personas + noise_floor) * n_questions, backend):
        raise PersonaDataError(problem)


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
    ray: str | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    responses_per_unit: int | None = None,
) -> PersonaResult:
    """Run the persona pipeline (DESIGN.md, pipeline 2) and return its result.

    Matrices (means over questions, nats; g = generating persona, o = other): see
    :func:`divscope.personas.matrices.aggregate`. ``loaded`` passes an already loaded
    ``(model, tokenizer)``; ``unit_cache`` overrides where units are cached (default
    ``<cache>/personas``). ``ray`` (``"local"`` or a cluster address) and ``workers`` run
    generation and scoring on Ray workers that each load ``model_name`` themselves
    (:func:`divscope.execution.make_executor`); ``executor`` passes one already made.
    ``responses_per_unit`` cuts a question's responses into units of that many (default: one
    unit per question); the numbers do not depend on it.

    Raises:
        PersonaCheckError: A consistency check failed (the result is attached as
            ``error.result``; outputs are still written by the caller if wanted).
        TemplateSeamError: The chat template breaks the prompt/response seam.
    """
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    gen["seed"] = seed
    check_generation(len(personas), len(questions), gen, backend, noise_floor=noise_floor)
    t0 = time.perf_counter()
    with executor_for(executor, ray, workers, device) as ex:
        setup = prepare(
            model_name, personas, questions, loaded=loaded, device=device, dtype=dtype,
            layers=layers, noise_floor=noise_floor, unit_cache=unit_cache, weights=not ex.remote,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        timings = {"load_model": time.perf_counter() - t0}
        local = None if ex.remote else Scorer(setup.model, setup.tokenizer)
        with ex.pool(partial(load_scorer, model_name, device, dtype), local) as pool:
            responses = generate_responses(
                setup, gen, pool, backend=backend, gen_batch_size=gen_batch_size,
                progress=progress, label=ex.label,
            )  # fmt: skip
            timings["generate"] = time.perf_counter() - t0 - timings["load_model"]
            seam = check_seam(setup, responses)
            t2 = time.perf_counter()
            units, n_cached = score_units(
                setup, responses, pool, persona_batch=persona_batch, progress=progress,
                label=ex.label, responses_per_unit=responses_per_unit,
            )  # fmt: skip
            timings["teacher_force"] = time.perf_counter() - t2
        described = ex.describe()
    matrices = aggregate(units, len(personas), len(questions))
    checks = check(setup, matrices, units, seam)
    timings["total"] = time.perf_counter() - t0
    params = {**gen, "layers": setup.layers, "backend": backend, "device": device}
    params |= {"dtype": dtype, "n_personas": len(personas), "n_questions": len(questions)}
    params["persona_batch"] = persona_batch
    result = PersonaResult(
        model_name,
        personas,
        questions,
        generation_records(setup, responses),
        matrices,
        per_prompt_rows(setup, units),
        cosine_matrices(hidden_states(setup, units), setup.layers),
        checks,
        run_metadata_record(setup, params, units, n_cached, timings, described),
        setup.cache,
    )
    raise_if_failed(result)
    return result


def raise_if_failed(result: PersonaResult) -> None:
    """Raise :class:`PersonaCheckError` (with the result attached) if a check failed."""
    checks = result.checks
    if not checks["all_ok"]:
        bad = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]
        err = PersonaCheckError(f"persona matrices failed checks: {bad}", checks)
        err.result = result  # type: ignore[attr-defined]
        raise err


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
    header = ["generator", "other", "question_id", "js", "kl_fwd", "kl_rev", "n_tokens"]
    text = csv_text(header, [[r[k] for k in header] for r in result.per_prompt])
    written["per_prompt.csv"] = atomic_write_text(out / "per_prompt.csv", text, overwrite=True)
    return written
