# %% [markdown]
# # kl_demo — on which prompts do two models answer most differently?
#
# Two sources. `SOURCE = "files"`: reads two files of sampled responses with per-token
# logprobs (same prompts, two models, e.g. from an API), scores every prompt with the best
# divergence measure the files support, and ranks them. `SOURCE = "models"`: runs two local
# models (a base and its fine-tuned or quantized variant, same tokenizer), samples from both
# and teacher-forces every response under both, so KL and JS are exact at every position over
# the whole vocabulary; the shipped pair is SmolLM2-135M-Instruct vs the same model with a
# pirate LoRA adapter (data/adapters/smollm2-pirate-lora/).
#
# With files and cross-scores (each model's logprobs of the other's responses) that is `mc_kl`, a
# Monte Carlo KL estimate (plus lower bounds from the top-k logprobs when the two models
# share a tokenizer); without them only the legacy position-aligned heuristic exists, and the
# output says so. The shipped data: SmolLM2-135M-Instruct vs Gemma-3-270M, 72 prompts in 10
# categories, 3 samples each, cross-scored both ways (see data/samples/smollm2_vs_gemma3/).
#
# Run it cell by cell in VS Code ("Run Cell" above each `# %%`), or end to end with
# `python kl_demo.py` (or `make demo`). Change the parameters below and rerun.
# Results go to `eval_results/<run>/`, figures to `figures/<run>/`.

# %% [markdown]
# ## Parameters

# %%
SOURCE = "files"  # "files": two sample files; "models": run MODEL_A and MODEL_B locally
MODEL1_FILE = "data/samples/smollm2_vs_gemma3/smollm2-135m-instruct.jsonl"  # model A samples
MODEL2_FILE = "data/samples/smollm2_vs_gemma3/gemma-3-270m.jsonl"  # model B, same prompts
MAX_PROMPTS = None  # score only the first K prompts (None = all)
TOP_N_DISPLAY = 10  # rows of the ranked table to show
METRIC = None  # rank by this metric (None = best available; see README for the list)
N_BOOTSTRAP = 1000  # bootstrap resamples: legacy_aligned CIs and category means
SEED = 0  # bootstrap seed
OUTPUT_DIR = "eval_results"  # results: OUTPUT_DIR/<run>/ranking.json + metadata.json
FIGURES_DIR = "figures"  # figures: FIGURES_DIR/<run>/*.png
RUN_PREFIX = "kl_demo"  # run names are <prefix>_<UTC timestamp>
MODEL_A = "smollm2-135m-instruct"  # models: the base, MODEL[,adapter=DIR][,dtype=DTYPE]
MODEL_B = "smollm2-135m-instruct,adapter=data/adapters/smollm2-pirate-lora"  # models: variant
PROMPTS_FILE = "data/prompts/prompts.jsonl"  # models: JSONL with prompt (and category)
N_PROMPTS = 20  # models: K prompts spread evenly over PROMPTS_FILE (None = all)
N_SAMPLES = 4  # models: responses per prompt from each model
MAX_NEW_TOKENS = 32  # models: tokens per response
TEMPERATURE = 1.0  # models: sampling temperature (1.0: the model's own distribution)
DEVICE = "cpu"  # models: "cpu" or "cuda"
DTYPE = "float32"  # models: weights of both (a spec's dtype=... overrides it)
RAY_ADDRESS = None  # models: None = this process; "local" = Ray here; "host:6379" = a Ray cluster
WORKERS = 1  # models: Ray workers, each holding both models (more than 1 needs RAY_ADDRESS)
LAYERS = False  # models: also where inside the model KL(A||B) arises, block by block (slower)
CAUSAL_BLOCKS = 2  # LAYERS: leading blocks whose mean change gets the causal check ("all": each)

# %% [markdown]
# ## Imports

# %%
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from divscope.diff.aggregate import METRICS as MODEL_METRICS
from divscope.diff.conditions import parse_spec
from divscope.diff.outputs import write_outputs
from divscope.diff.pipeline import read_prompts, run_diff
from divscope.estimators.contributions import token_contributions
from divscope.estimators.ranking import ALL_METRICS, category_summary, rank_prompts
from divscope.models.load import DTYPES
from divscope.params import (
    check_causal_blocks,
    check_choice,
    check_device,
    check_int,
    check_model,
    check_number,
    check_output_dir,
    check_path,
    check_run_prefix,
    check_seed,
    check_workers,
    one_line_errors,
    parameter,
)
from divscope.report import layer_plots, plots
from divscope.report.tables import Table, fmt, fmt_ci, frame_table, ranking_table
from divscope.runmeta import atomic_write_json, new_run_dir, run_metadata
from divscope.samples import load_pair

t_start = time.perf_counter()


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
one_line_errors("kl_demo.py")
check_choice("SOURCE", SOURCE, ("files", "models"))
if SOURCE == "files":
    check_path("MODEL1_FILE", MODEL1_FILE)
    check_path("MODEL2_FILE", MODEL2_FILE)
    why = "kl and js are exact metrics of SOURCE = 'models'" if METRIC in MODEL_METRICS else ""
    check_choice("METRIC", METRIC, (None, *ALL_METRICS), why)
    check_int("MAX_PROMPTS", MAX_PROMPTS, none=True)
    check_choice("LAYERS", LAYERS, (False,), "the per-block view runs two local models: set "
                 "SOURCE = 'models'")  # fmt: skip
else:
    check_model("MODEL_A", MODEL_A)
    check_model("MODEL_B", MODEL_B)
    check_path("PROMPTS_FILE", PROMPTS_FILE)
    check_choice("METRIC", METRIC, (None, *MODEL_METRICS))
    check_int("N_PROMPTS", N_PROMPTS, none=True)
    check_int("N_SAMPLES", N_SAMPLES)
    check_int("MAX_NEW_TOKENS", MAX_NEW_TOKENS)
    check_number("TEMPERATURE", TEMPERATURE)
    check_device("DEVICE", DEVICE)
    check_choice("DTYPE", DTYPE, DTYPES)
    check_workers("WORKERS", WORKERS, "RAY_ADDRESS", RAY_ADDRESS)
    check_choice("LAYERS", LAYERS, (False, True))
    check_causal_blocks("CAUSAL_BLOCKS", CAUSAL_BLOCKS)
check_int("TOP_N_DISPLAY", TOP_N_DISPLAY)
check_int("N_BOOTSTRAP", N_BOOTSTRAP)
check_seed("SEED", SEED)
check_output_dir("OUTPUT_DIR", OUTPUT_DIR)
check_output_dir("FIGURES_DIR", FIGURES_DIR)
check_run_prefix("RUN_PREFIX", RUN_PREFIX)

# %% [markdown]
# ## Load the two sample files, or run the two models and write their samples

# %%
diff = None
if SOURCE == "models":
    diff = run_diff(
        parse_spec(MODEL_A, default_dtype=DTYPE),
        parse_spec(MODEL_B, default_dtype=DTYPE),
        read_prompts(PROMPTS_FILE, N_PROMPTS, spread=True),
        samples=N_SAMPLES,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        metric=METRIC,
        n_bootstrap=N_BOOTSTRAP,
        seed=SEED,
        device=DEVICE,
        ray=RAY_ADDRESS,
        workers=WORKERS,
        layers=LAYERS,
        causal_blocks=CAUSAL_BLOCKS,
    )
run_dir = None  # created once the inputs have loaded (and, for files, ranked)
if diff is not None:  # both sides' samples as sample files: every cell below reads them
    run_dir = new_run_dir(Path(OUTPUT_DIR), RUN_PREFIX)
    write_outputs(diff, run_dir)
    a, b = load_pair(run_dir / "samples_a.jsonl", run_dir / "samples_b.jsonl")
else:
    a, b = load_pair(MODEL1_FILE, MODEL2_FILE)
t_loaded = time.perf_counter()

# %% [markdown]
# ## Data summary: prompts, responses per prompt, models, coverage

# %%
fields = {
    "model": lambda s: s.model,
    "file": lambda s: s.path.name,
    "format": lambda s: s.source_format,
    "prompts": lambda s: len(s.records),
    "responses/prompt": lambda s: np.mean([len(r.responses) for r in s.records]),
    "excluded (no logprobs)": lambda s: s.n_excluded,
    "tokens/response": lambda s: np.mean([len(x.scores) for r in s.records for x in r.usable]),
    "top-k": lambda s: max(x.scores.top_ids.shape[1] for r in s.records for x in r.usable),
    "cross-scored by other": lambda s: s.has_cross_scores((b if s is a else a).model),
}
summary = Table(
    ({"": k, "A": f(a), "B": f(b)} for k, f in fields.items()), flex=("A", "B"), min_flex=30
)
display(summary)

# %% [markdown]
# ## One example prompt and response

# %%
example = a.records[0]
print(f"PROMPT [{example.index}]: {example.prompt}\n")
r0 = example.usable[0]
print(f"{a.model} (response 0, {len(r0.scores)} tokens, finish: {r0.finish_reason}):")
print(r0.text[:800] + ("…" if len(r0.text) > 800 else ""))
first = Table(
    {
        "token": repr(tok),
        "logprob": lp,
        "top-3 (logprob)": ", ".join(
            f"{a.vocab.strings[j]!r}:{fmt(v)}" for j, v in zip(ids[:3], lps[:3], strict=True)
        ),
    }
    for tok, lp, ids, lps in zip(
        r0.scores.tokens[:8],
        r0.scores.logprobs[:8],
        r0.scores.top_ids[:8],
        r0.scores.top_logprobs[:8],
        strict=True,
    )
)
display(first)

# %% [markdown]
# ## Score and rank every prompt (models: the exact scores computed above)

# %%
if diff is not None:
    ranking = diff.ranking
else:
    with parameter("METRIC", METRIC):
        ranking = rank_prompts(
            a, b, metric=METRIC, max_prompts=MAX_PROMPTS, n_bootstrap=N_BOOTSTRAP, seed=SEED
        )
    run_dir = new_run_dir(Path(OUTPUT_DIR), RUN_PREFIX)
fig_dir = Path(FIGURES_DIR) / run_dir.name
fig_dir.mkdir(parents=True, exist_ok=True)
t_ranked = time.perf_counter()
print(f"ranked by {ranking.metric} [{ranking.units[ranking.metric]}]")
for note in ranking.notes:
    print("note:", note)
display(ranking_table(ranking, TOP_N_DISPLAY))

# %% [markdown]
# ## The most different prompt, in full, with a token-level view

# %%
top = min((p for p in ranking.prompts if p.rank is not None), key=lambda p: p.rank)
ra, rb = a.record(top.index), b.record(top.index)
m, level = ranking.metric, round(ranking.ci_level * 100)
print(f"#1 by {m} = {fmt(top.scores[m])} {ranking.units[m]}, {level}% CI {fmt_ci(top.ci[m])}")
print(f"PROMPT [{top.index}]: {top.prompt}\n")
for name, rec in (("A: " + a.model, ra), ("B: " + b.model, rb)):
    print(f"--- {name}, response 0 of {len(rec.usable)} ---")
    print(rec.usable[0].text[:1000] + ("…" if len(rec.usable[0].text) > 1000 else ""), "\n")
if diff is not None and diff.units:  # exact: KL(P_A||P_B) at each position of response 0
    i = next(i for i, p in enumerate(diff.setup.prompts) if p.index == top.index)
    tokens = ra.usable[0].scores.tokens
    values = diff.units[i].sides["a"].split("kl_ab")[0]
    what = "exact KL(P_A||P_B) at each position (nats; darker: more different)"
else:
    tokens, values, kind = token_contributions(ra, rb, 0, model_b=b.model)
    what = (
        f"per-token {kind} contribution (red: A more likely than B; blue: B more likely; "
        "grey: not matched in B)"
    )
fig = plots.token_view(tokens, values, title=f"A's response 0 to prompt #{top.index}: {what}")
show(fig, "top_prompt_tokens")

# %% [markdown]
# ## Models: the dataset summary (llama.cpp's KL report, on each side's samples)

# %%
if diff is not None and diff.units:
    rows = {
        k: diff.summary[f"on_{s}_samples"] for k, s in (("A's samples", "a"), ("B's samples", "b"))
    }
    keys = ["kl_direction", "tokens", "kl_mean", "kl_se", "kl_max", "same_top_rate"]
    keys += ["same_top_rate_se", "rms_dp", "ln_ppl_ratio_b_over_a", "js_mean", "js_se"]
    table = pd.DataFrame({k: {c: v[c] for c in keys} for k, v in rows.items()})
    pct = pd.DataFrame({k: v["kl_percentiles"] for k, v in rows.items()})
    display(frame_table(table, index="measure"))
    display(frame_table(pct.rename(index=lambda p: f"KL percentile {p}"), index="percentile"))
    for note in diff.summary["notes"]:
        print("note:", note)
else:
    print("no exact values (SOURCE = 'files', or two tokenizers): no dataset summary")

# %% [markdown]
# ## Models: what changed — the tokens B raises and lowers most, over every scored position

# %%
if diff is not None and diff.units:
    ch = diff.changed["overall"]
    if ch.get("note"):  # identical models: no token raised or lowered
        print(ch["note"])
    else:
        display(
            Table(
                {
                    "raised in B": repr(up["token"]),
                    "mean Δp": up["delta_prob"],
                    "lowered in B": repr(down["token"]),
                    "mean Δp ": down["delta_prob"],
                }
                for up, down in zip(
                    ch["boosted_in_b"][:12], ch["suppressed_in_b"][:12], strict=False
                )
            )
        )
    for cat, c in diff.changed["by_category"].items():
        if c.get("note"):
            print(f"{cat}: {c['note']}")
            continue
        up = ", ".join(repr(t["token"]) for t in c["boosted_in_b"][:5])
        down = ", ".join(repr(t["token"]) for t in c["suppressed_in_b"][:5])
        print(f"{cat}: B raises {up}; lowers {down}")

# %% [markdown]
# ## Models: where inside the model (`LAYERS = True`)
# Walking from B to A one part at a time (embeddings, each block, the head), each part's share
# of KL(A||B) on A's samples (the shares sum exactly to 1), the same in the other order, the
# drift of the residual stream after each block, and what each block's mean change promotes
# and suppresses (read out through the final norm and head). `direction`: the share of
# KL(A||B) that B's component along that mean change alone reproduces in A (the causal check,
# for the CAUSAL_BLOCKS leading blocks; `p` against random directions). Written to `layers.json`.

# %%
if diff is not None and diff.layers:
    lay = diff.layers
    print(
        f"KL(A||B) {lay['kl_total']:.4g} nats/token; embeddings {lay['embedding_fraction']:.3f}, "
        f"head {lay['head_fraction']:.3f} of it"
    )
    for line in lay["sentences"]:
        print(line)
    display(
        Table(
            {
                "block": r["layer"],
                "fraction": r["fraction"],
                "95% CI": fmt_ci(r["fraction_ci"]),
                "reverse": r["fraction_reverse"],
                "drift": r["drift_rel_norm"],
                "promotes": ", ".join(repr(t["token"]) for t in r["promotes"][:3]),
                "suppresses": ", ".join(repr(t["token"]) for t in r["suppresses"][:3]),
                "direction": fmt(r["direction_fraction"]),  # "-": block not checked
                "p": fmt(r.get("direction_p")),
            }
            for r in lay["layers"]
        )
    )
    show(layer_plots.layer_fractions(lay), "layers")
else:
    print("LAYERS = False (or SOURCE = 'files'): no per-block decomposition")

# %% [markdown]
# ## Summary statistics

# %%
m = ranking.metric
vals = np.array([p.scores[m] for p in ranking.prompts if p.scores.get(m) is not None])
stats = {"metric": m, "prompts": len(vals), "mean": vals.mean(), "std": vals.std(ddof=1)}
qs = ("min", "25%", "median", "75%", "max")
stats |= dict(zip(qs, np.percentile(vals, [0, 25, 50, 75, 100]), strict=True))
stats["unscored"] = sum(p.rank is None for p in ranking.prompts)
if diff is None:
    stats["matched-token share"] = np.mean(
        [p.coverage.get("matched_token_share", np.nan) for p in ranking.prompts]
    )
display(Table([stats]))

# %% [markdown]
# ## Per-category means (bootstrap CI over the category's prompts)

# %%
if any(p.category for p in ranking.prompts):
    display(Table(category_summary(ranking, n_bootstrap=N_BOOTSTRAP, seed=SEED)))
else:
    print("no prompt categories in these files")

# %% [markdown]
# ## Figures: prompts x metrics, ranked scores with CIs, score distribution, categories

# %%
show(plots.score_heatmap(ranking, top=TOP_N_DISPLAY), "heatmap_prompts_x_metrics")
show(plots.ranked_scores(ranking, top=TOP_N_DISPLAY), "ranked_scores")
show(plots.score_distribution(ranking), "score_distribution")
if any(p.category for p in ranking.prompts):
    show(plots.category_means(ranking, seed=SEED), "category_means")
else:
    print("no prompt categories in these files; skipping the per-category figure")

# %% [markdown]
# ## Save the ranking and a metadata record

# %%
if diff is None:
    atomic_write_json(run_dir / "ranking.json", ranking.to_json())
    params = {"SOURCE": SOURCE, "MODEL1_FILE": MODEL1_FILE, "MODEL2_FILE": MODEL2_FILE}
    params["MAX_PROMPTS"] = MAX_PROMPTS
else:  # ranking.json, summary.json, what_changed.json and the samples are written above
    params = {"SOURCE": SOURCE, "MODEL_A": MODEL_A, "MODEL_B": MODEL_B}
    params |= {"PROMPTS_FILE": PROMPTS_FILE, "N_PROMPTS": N_PROMPTS, "N_SAMPLES": N_SAMPLES}
    params |= {"MAX_NEW_TOKENS": MAX_NEW_TOKENS, "TEMPERATURE": TEMPERATURE, "DTYPE": DTYPE}
    params |= {"LAYERS": LAYERS, "CAUSAL_BLOCKS": CAUSAL_BLOCKS}
params |= {"METRIC": ranking.metric, "N_BOOTSTRAP": N_BOOTSTRAP, "SEED": SEED}
meta = run_metadata(
    "kl_demo",
    params,
    models=ranking.models,
    figures=str(fig_dir),
    timings_s={
        "load": t_loaded - t_start,
        "rank": t_ranked - t_loaded,
        "total": time.perf_counter() - t_start,
    },
)
if diff is not None:
    meta["diff"] = diff.metadata
atomic_write_json(run_dir / "metadata.json", meta, overwrite=diff is not None)
print(f"wrote {run_dir}/ranking.json and metadata.json; figures in {fig_dir}")

# %% [markdown]
# ## A self-contained HTML report of this run (tables, figures, token view with hover)

# %%
from divscope.report.html import build_report

report_path = build_report(run_dir, run_dir / "report.html")[0]
print(f"report: {report_path.resolve()}")
