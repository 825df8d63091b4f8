"""Loaders on the real files, on malformed ones, and fuzzed with hypothesis."""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
from conftest import EMPTY_JSON, GEMMA_JSON, PKL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from divscope.samples import load_pair, load_samples, write_samples_jsonl
from divscope.samples.errors import SampleFileError

REAL = json.loads(GEMMA_JSON.read_text())


def _write_json(tmp_path, obj, name="f.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


# ---------------------------------------------------------------- real files


def test_real_openrouter_json():
    s = load_samples(GEMMA_JSON)
    assert s.model == "google/gemma-2-9b-it" and s.source_format == "json"
    assert [len(r.responses) for r in s.records] == [5, 5]
    r = s.records[0].responses[0]
    raw = REAL[0]["responses"][0]["choices"][0]["logprobs"]["content"]
    assert r.scores.tokens == [d["token"] for d in raw]
    np.testing.assert_array_equal(r.scores.logprobs, [d["logprob"] for d in raw])
    assert r.scores.top_ids.shape == (len(raw), 5)
    top = [s.vocab.strings[j] for j in r.scores.top_ids[3]]
    assert top == [e["token"] for e in raw[3]["top_logprobs"]]
    # byte offsets come from the `bytes` fields
    assert r.scores.byte_offsets[1] == len(raw[0]["bytes"])
    assert r.excluded_reason is None


def test_real_legacy_pickle():
    s = load_samples(PKL)
    assert s.model == "cloud" and s.source_format == "pickle"
    assert [len(r.responses) for r in s.records] == [10, 10]
    assert all(r.scores is not None for rec in s.records for r in rec.responses)


def test_all_empty_run_is_a_clear_error():
    with pytest.raises(SampleFileError) as e:
        load_samples(EMPTY_JSON)
    msg = str(e.value)
    assert str(EMPTY_JSON) in msg and "came back empty" in msg and "Fix:" in msg


def test_pair_shares_vocab_and_prompts():
    a, b = load_pair(PKL, GEMMA_JSON)
    assert a.vocab is b.vocab
    assert [r.prompt for r in a.records] == [r.prompt for r in b.records]


def test_jsonl_round_trip(tmp_path):
    s = load_samples(PKL)
    out = write_samples_jsonl(s, tmp_path / "cloud.jsonl")
    t = load_samples(out)
    assert t.source_format == "jsonl" and t.model == s.model
    for ra, rb in zip(s.records, t.records, strict=True):
        assert ra.prompt == rb.prompt
        for x, y in zip(ra.responses, rb.responses, strict=True):
            assert x.text == y.text and x.scores.tokens == y.scores.tokens
            np.testing.assert_array_equal(x.scores.logprobs, y.scores.logprobs)
            np.testing.assert_array_equal(x.scores.top_logprobs, y.scores.top_logprobs)
            assert [[s.vocab.strings[j] for j in row if j >= 0] for row in x.scores.top_ids] == [
                [t.vocab.strings[j] for j in row if j >= 0] for row in y.scores.top_ids
            ]
    with pytest.raises(FileExistsError):
        write_samples_jsonl(s, out)  # never overwrites silently


# ---------------------------------------------------------------- malformed files


def test_prompts_differ_names_index_and_both_prompts(tmp_path):
    bad = copy.deepcopy(REAL)
    bad[1]["prompt"] = "a different question"
    p = _write_json(tmp_path, bad)
    with pytest.raises(SampleFileError) as e:
        load_pair(PKL, p)
    msg = str(e.value)
    assert "record 1" in msg and "what are you?" in msg and "a different question" in msg


def test_prompt_count_differs(tmp_path):
    p = _write_json(tmp_path, REAL[:1])
    with pytest.raises(SampleFileError, match="has 2 prompts"):
        load_pair(PKL, p)


@pytest.mark.parametrize("value,what", [(math.nan, "NaN"), (math.inf, r"\+inf"), (0.5, "> 0")])
def test_bad_logprob_values(tmp_path, value, what):
    bad = copy.deepcopy(REAL)
    bad[1]["responses"][2]["choices"][0]["logprobs"]["content"][7]["logprob"] = value
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))  # Python writes NaN / Infinity
    with pytest.raises(SampleFileError, match=what) as e:
        load_samples(p)
    assert "record 1, response 2, token 7" in str(e.value)


def test_nan_in_top_logprobs(tmp_path):
    bad = copy.deepcopy(REAL)
    bad[0]["responses"][0]["choices"][0]["logprobs"]["content"][2]["top_logprobs"][1]["logprob"] = (
        math.nan
    )
    with pytest.raises(SampleFileError, match="record 0, response 0, token 2: logprob is NaN"):
        load_samples(_write_json(tmp_path, bad))


def test_record_without_responses(tmp_path):
    bad = copy.deepcopy(REAL)
    bad[1]["responses"] = []
    with pytest.raises(SampleFileError, match="record 1: no responses"):
        load_samples(_write_json(tmp_path, bad))


def test_truncated_json(tmp_path):
    p = tmp_path / "cut.json"
    p.write_bytes(GEMMA_JSON.read_bytes()[:100_000])
    with pytest.raises(SampleFileError, match="truncated or corrupt JSON"):
        load_samples(p)


def test_truncated_jsonl_names_the_line(tmp_path):
    s = load_samples(GEMMA_JSON)
    p = write_samples_jsonl(s, tmp_path / "g.jsonl")
    text = p.read_text()
    p.write_text(text[: len(text) - 500])
    with pytest.raises(SampleFileError, match=r"record 1: line 2 \(record 1\) is truncated"):
        load_samples(p)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(SampleFileError, match="no such file"):
        load_samples(tmp_path / "nope.json")
    (tmp_path / "e.json").write_text("  \n")
    with pytest.raises(SampleFileError, match="empty"):
        load_samples(tmp_path / "e.json")


def test_response_without_logprobs_is_excluded_not_scored(tmp_path):
    bad = copy.deepcopy(REAL)
    bad[0]["responses"][1]["choices"][0]["logprobs"] = None
    bad[0]["responses"][3] = {"error": {"code": 502, "message": "upstream"}}
    s = load_samples(_write_json(tmp_path, bad))
    rec = s.records[0]
    assert len(rec.responses) == 5 and len(rec.usable) == 3
    assert rec.responses[1].excluded_reason == "no logprobs in the response"
    assert "API error" in rec.responses[3].excluded_reason
    assert s.n_excluded == 2


def test_mixed_models_in_one_file(tmp_path):
    bad = copy.deepcopy(REAL)
    bad[1]["model"] = "someone/else"
    with pytest.raises(SampleFileError, match="mixes models"):
        load_samples(_write_json(tmp_path, bad))


# ---------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_SMALL = [
    {"prompt": r["prompt"], "model": r["model"], "responses": copy.deepcopy(r["responses"][:1])}
    for r in REAL
]
for _r in _SMALL:
    _c = _r["responses"][0]["choices"][0]
    _c["logprobs"]["content"] = _c["logprobs"]["content"][:4]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


_ALL_PATHS = list(_paths(_SMALL))


def _set(obj, path, value):
    if not path:
        return value
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


def _load_or_error(p):
    try:
        load_samples(p)
    except SampleFileError as e:
        assert str(p) in str(e) and "Fix:" in str(e)


FUZZ = settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(value=json_values)
def test_fuzz_any_json_document(tmp_path, value):
    _load_or_error(_write_json(tmp_path, value))


@FUZZ
@given(path=st.sampled_from(_ALL_PATHS), value=json_values)
def test_fuzz_mutated_records(tmp_path, path, value):
    doc = _set(copy.deepcopy(_SMALL), path, value)
    _load_or_error(_write_json(tmp_path, doc))
    # the same document as JSONL and as a pickle
    if isinstance(doc, list) and all(isinstance(r, dict) for r in doc) and doc:
        p = tmp_path / "f.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in doc))
        _load_or_error(p)
    q = tmp_path / "f.pkl"
    q.write_bytes(pickle.dumps(doc))
    _load_or_error(q)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), junk=st.binary(max_size=20))
def test_fuzz_truncated_and_corrupted_bytes(tmp_path, cut, junk):
    raw = json.dumps(_SMALL).encode()
    for name, data in (
        ("t.json", raw[:cut] + junk),
        ("t.pkl", pickle.dumps(_SMALL)[:cut] + junk),
        ("t.jsonl", raw[:cut].replace(b"}, {", b"}\n{") + junk),
    ):
        p = tmp_path / name
        p.write_bytes(data)
        _load_or_error(p)
