# %% [markdown]
# # persona_js_demo — which personas of one model are close or far in what it outputs?
#
# One model, N personas (system prompts), Q questions. Each persona answers each question
# (greedy); every answer's exact token ids are then teacher-forced under every persona, and the
# next-token distributions are compared over the whole vocabulary: JS and KL in both
# directions, in nats, averaged over the answer's positions and over questions. Next to it:
# cosine between the personas' hidden states where generation starts, per layer.
#
# Run it cell by cell in VS Code, or whole with `python persona_js_demo.py` (or
# `make persona-demo`). Generations, scores and explanations are cached by content, so a
# rerun takes a small fraction of the first run (benchmarks/bench_rerun.py). Outputs go to
# `OUTPUT_DIR/<run>/` and figures to `figures/<run>/`. For Qwen2.5-7B-Instruct on a GPU set
# MODEL = "Qwen/Qwen2.5-7B-Instruct", BACKEND = "vllm", DEVICE = "cuda", DTYPE = "bfloat16".

# %% [markdown]
# ## Parameters

# %%
MODEL = "smollm2-135m-instruct"  # hub name, local path, or smollm2-135m-instruct / gemma3-270m
BACKEND = "hf"  # generation backend: "hf" (transformers, CPU/GPU) or "vllm" (GPU)
DEVICE = "cpu"  # "cpu" or "cuda"
DTYPE = "float32"  # model weights; divergences are always computed in fp32
PERSONAS_FILE = "data/personas/core.yaml"  # personas: [{name, prompt}]
QUESTIONS_FILE = "data/questions/eval20.yaml"  # questions: [{id, text, category}]
N_PERSONAS = 6  # the first N personas of the file
N_QUESTIONS = 6  # the first Q questions of the file
EXPLAIN_PAIRS = 2  # token-level "what changed" for the N farthest persona pairs
MAX_NEW_TOKENS = 48  # tokens generated per answer (greedy)
LAYERS = None  # hidden_states indices for cosine (None = 4 evenly spaced, ending at the last)
LEAKAGE_FILE = None  # optional leakage CSV (source,target,rate) or marker_eval dir for the stats
OUTPUT_DIR = "eval_results"  # results: OUTPUT_DIR/<run>/*.json, per_prompt.csv
FIGURES_DIR = "figures"  # figures: FIGURES_DIR/<run>/*.png
RUN_PREFIX = "persona_js"  # run names are <prefix>_<UTC timestamp>
RAY_ADDRESS = None  # None = this process; "local" = Ray here; "host:6379" = a Ray cluster
WORKERS = 1  # Ray workers, each holding the model (more than 1 needs RAY_ADDRESS)

# %% [markdown]
# ## Imports

# %%
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from scipy.stats import spearmanr

from divscope.models.load import DTYPES, load_model
from divscope.params import (
    check_backend,
    check_choice,
    check_device,
    check_indices,
    check_int,
    check_model,
    check_output_dir,
    check_path,
    check_run_prefix,
    check_workers,
    one_line_errors,
    parameter,
)
from divscope.personas.data import load_personas, load_questions
from divscope.personas.matrices import CHECK_DESCRIPTIONS
from divscope.personas.pipeline import run_personas, write_outputs
from divscope.report import persona_plots
from divscope.report.tables import Table, analysis_summary, checks_table, fmt
from divscope.runmeta import new_run_dir


def show(fig: plt.Figure, name: str) -> None:
    """Save a figure under the run's figure directory, then show it (no-op when headless)."""
    path = fig_dir / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"saved {path}")
    if matplotlib.get_backend().lower().endswith("agg"):
        plt.close(fig)
    else:
        plt.show()


# %% [markdown]
# ## Check the parameters: a bad value stops here, in one line that names it

# %%
one_line_errors("persona_js_demo.py")
check_model("MODEL", MODEL)
check_backend("BACKEND", BACKEND)
check_device("DEVICE", DEVICE)
check_choice("DTYPE", DTYPE, DTYPES)
check_path("PERSONAS_FILE", PERSONAS_FILE)
check_path("QUESTIONS_FILE", QUESTIONS_FILE)
check_int("MAX_NEW_TOKENS", MAX_NEW_TOKENS)
check_indices("LAYERS", LAYERS)
check_int("EXPLAIN_PAIRS", EXPLAIN_PAIRS, minimum=0)
check_path("LEAKAGE_FILE", LEAKAGE_FILE, none=True, directory=True)
check_workers("WORKERS", WORKERS, "RAY_ADDRESS", RAY_ADDRESS)
check_output_dir("OUTPUT_DIR", OUTPUT_DIR)
check_output_dir("FIGURES_DIR", FIGURES_DIR)
check_run_prefix("RUN_PREFIX", RUN_PREFIX)

# %% [markdown]
# ## The personas and questions

# %%
with parameter("PERSONAS_FILE", PERSONAS_FILE):
    personas = load_personas(PERSONAS_FILE)
with parameter("QUESTIONS_FILE", QUESTIONS_FILE):
    questions = load_questions(QUESTIONS_FILE)
check_int("N_PERSONAS", N_PERSONAS, minimum=2, maximum=len(personas), none=True,
          why=f"PERSONAS_FILE has {len(personas)} personas")  # fmt: skip
check_int("N_QUESTIONS", N_QUESTIONS, maximum=len(questions), none=True,
          why=f"QUESTIONS_FILE has {len(questions)} questions")  # fmt: skip
personas, questions = personas[:N_PERSONAS], questions[:N_QUESTIONS]
leakage = None
if LEAKAGE_FILE:
    from divscope.stats.analysis import load_leakage

    with parameter("LEAKAGE_FILE", LEAKAGE_FILE):
        leakage = load_leakage(LEAKAGE_FILE)
display(Table({"persona": p.name, "system prompt": p.prompt} for p in personas))
display(Table({"id": q.id, "category": q.category, "question": q.text} for q in questions))

# %% [markdown]
# ## Generate, teacher-force every answer under every persona, aggregate (cached by content)

# %%
loaded = load_model(MODEL, device=DEVICE, dtype=DTYPE)
result = run_personas(
    MODEL,
    personas,
    questions,
    max_new_tokens=MAX_NEW_TOKENS,
    layers=LAYERS,
    backend=BACKEND,
    device=DEVICE,
    dtype=DTYPE,
    loaded=loaded,
    ray=RAY_ADDRESS,
    workers=WORKERS,
)
run_dir = new_run_dir(Path(OUTPUT_DIR), RUN_PREFIX)
fig_dir = Path(FIGURES_DIR) / run_dir.name
fig_dir.mkdir(parents=True, exist_ok=True)
write_outputs(result, run_dir)
meta = result.metadata
print(
    f"model {MODEL}: {meta['units']} answers teacher-forced under {len(personas) + 1} "
    f"personas (incl. a twin for the noise floor), {meta['tokens_scored']} positions scored, "
    f"{meta['units_from_cache']} from cache; {fmt(meta['timings_s']['total'])} s"
)
for w in meta["warnings"]:
    print("warning:", w)

# %% [markdown]
# ## An example generation under two personas

# %%
names = result.names
q0 = questions[0]
for rec in result.records:
    if rec["question_id"] == q0.id and rec["persona"] in names[:2]:
        print(f"[{rec['persona']}] {q0.text}\n  -> {rec['response_text']!r}\n")

# %% [markdown]
# ## Heatmaps: JS (clustered), signed KL asymmetry, centred cosine per layer

# %%
m = result.matrices
order = persona_plots.cluster_order(m["js"])
show(
    persona_plots.matrix_heatmap(
        m["js"],
        names,
        order=order,
        label="JS [nats]",
        title="JS between personas (teacher-forced, symmetric)",
    ),
    "js",
)
show(
    persona_plots.matrix_heatmap(
        m["kl_asym"],
        names,
        order=order,
        diverging=True,
        label="nats",
        title="KL asymmetry: KL(P_row || P_col) - KL(P_col || P_row), row's answers vs col's",
    ),
    "kl_asym",
)
for layer in result.cosine["layers"]:
    show(
        persona_plots.matrix_heatmap(
            result.cosine["centred"][str(layer)],
            names,
            order=order,
            diverging=True,
            label="cosine",
            title=f"centred cosine, hidden_states[{layer}]",
        ),
        f"cosine_l{layer}",
    )

# %% [markdown]
# ## The closest and farthest persona pairs

# %%
iu = np.triu_indices(len(names), 1)
pairs = pd.DataFrame(
    {
        "pair": [f"{names[i]} / {names[j]}" for i, j in zip(*iu, strict=True)],
        "js": m["js"][iu],
        "kl_sym": m["kl_sym"][iu],
        "kl_asym": m["kl_asym"][iu],
        **{
            f"cos L{layer}": np.asarray(result.cosine["centred"][str(layer)])[iu]
            for layer in result.cosine["layers"]
        },
    }
).sort_values("js")
units = "JS, KL in nats; kl_asym = KL on a's answers - KL on b's; cos: centred cosine"
display(Table(pairs.head(5).to_dict("records"), title="closest pairs:", flex=()))
far = pairs.tail(5).iloc[::-1].to_dict("records")
display(Table(far, title="farthest pairs:", flex=(), footer=[units]))

# %% [markdown]
# ## JS vs cosine, per layer (Spearman rho over persona pairs)

# %%
for layer in result.cosine["layers"]:
    cos = np.asarray(result.cosine["centred"][str(layer)])
    show(
        persona_plots.js_vs_cosine(m["js"], cos, names, layer=str(layer)), f"js_vs_cosine_l{layer}"
    )
rhos = {
    layer: spearmanr(np.asarray(result.cosine["centred"][str(layer)])[iu], m["js"][iu]).statistic
    for layer in result.cosine["layers"]
}
print("Spearman rho (JS vs centred cosine):", ", ".join(f"L{k} {fmt(v)}" for k, v in rhos.items()))

# %% [markdown]
# ## Statistics: discrimination gate, redundancy with cosine (Mantel), per-question spread

# %%
from divscope.stats import analysis as stats

mats, cosines = stats.matrices_from_result(result), stats.cosine_from_result(result)
analysis = stats.analyze(
    mats,
    cosines,
    leakage,
    n_perm=999,
    n_boot=500,
)
for item in analysis_summary(analysis):
    display(item)
pq = analysis["per_question"]
display(
    Table(
        {
            "question": k,
            **{x: v[x] for x in ("js_mean", "js_std", "cv")},
            "text": next(q.text for q in questions if q.id == k),
        }
        for k, v in pq["questions"].items()
    )
)

# %% [markdown]
# ## Leakage (only with LEAKAGE_FILE): JS vs cosine as predictors, KL asymmetry

# %%
if LEAKAGE_FILE:
    lk = analysis["leakage"]
    print(f"JS vs leakage over {lk['n_pairs']} directed pairs: rho {fmt(lk['js_spearman_rho'])}")
    for key in lk["cosine"]:
        vals = [
            next(c for c in cosines if c.key == key).value(p["source"], p["target"])
            for p in lk["directed_pairs"]
        ]
        show(persona_plots.leakage_side_by_side(lk, key, vals), "leakage_" + key.replace("/", "_"))
    show(persona_plots.kl_asymmetry_vs_leakage(analysis["kl_asymmetry"]), "kl_asym_vs_leakage")
else:
    print(
        "no LEAKAGE_FILE: set it to a source,target,rate CSV to compare JS and cosine as "
        "predictors of leakage"
    )

# %% [markdown]
# ## Consistency checks (a failed check raises before this cell)

# %%
display(checks_table(result.checks, CHECK_DESCRIPTIONS))
print(f"all checks ok: {result.checks['all_ok']}; results in {run_dir}, figures in {fig_dir}")

# %% [markdown]
# ## What changed for the farthest pairs, then a self-contained HTML report of the run

# %%
from divscope.personas.explain import explain_run
from divscope.report.html import build_report
from divscope.runmeta import atomic_write_json

explanations = explain_run(
    *loaded, result.records, names, m["js"], n_pairs=EXPLAIN_PAIRS, cache=result.cache
)
atomic_write_json(run_dir / "explain.json", explanations)
for ex in explanations:
    boosted = ", ".join(repr(t["token"]) for t in ex["what_changed"]["boosted_in_b"][:6])
    suppressed = ", ".join(repr(t["token"]) for t in ex["what_changed"]["suppressed_in_b"][:6])
    print(f"{ex['a']} -> {ex['b']}: boosts {boosted}; suppresses {suppressed}")
report_path = build_report(run_dir, run_dir / "report.html")[0]
print(f"report: {report_path.resolve()}")
