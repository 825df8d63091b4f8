"""The packed .npz sample format: lossless round trips, the same rankings, clear errors."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import GEMMA_JSON, PKL, ROOT
from hypothesis import given
from hypothesis import strategies as st
from test_samples import FUZZ

from divscope.cli import main
from divscope.estimators.ranking import rank_prompts
from divscope.samples import SampleSet, TokenScores, load_pair, load_samples
from divscope.samples.errors import SampleFileError
from divscope.samples.packed import write_samples_packed

SHIPPED = ROOT / "data" / "samples" / "smollm2_vs_gemma3"


def _same_scores(x: TokenScores | None, y: TokenScores | None, sx: SampleSet, sy: SampleSet):
    assert (x is None) == (y is None)
    if x is None:
        return
    assert x.tokens == y.tokens
    assert [sx.vocab.strings[i] for i in x.ids] == [sy.vocab.strings[i] for i in y.ids]
    np.testing.assert_array_equal(x.logprobs, y.logprobs)
    np.testing.assert_array_equal(x.top_logprobs, y.top_logprobs)
    assert [[sx.vocab.strings[j] for j in row if j >= 0] for row in x.top_ids] == [
        [sy.vocab.strings[j] for j in row if j >= 0] for row in y.top_ids
    ]
    for name in ("token_ids", "byte_offsets"):
        a, b = getattr(x, name), getattr(y, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def _same_sets(s: SampleSet, t: SampleSet) -> None:
    assert t.model == s.model and len(t.records) == len(s.records)
    for ra, rb in zip(s.records, t.records, strict=True):
        assert (ra.index, ra.prompt, ra.model, ra.category) == (
            rb.index,
            rb.prompt,
            rb.model,
            rb.category,
        )
        for x, y in zip(ra.responses, rb.responses, strict=True):
            assert (x.text, x.finish_reason, x.excluded_reason) == (
                y.text,
                y.finish_reason,
                y.excluded_reason,
            )
            _same_scores(x.scores, y.scores, s, t)
            assert sorted(x.cross) == sorted(y.cross)
            for m in x.cross:
                assert x.cross[m].aligned == y.cross[m].aligned
                _same_scores(x.cross[m].scores, y.cross[m].scores, s, t)


@pytest.mark.parametrize(
    "source", [PKL, GEMMA_JSON, SHIPPED / "smollm2-135m-instruct.jsonl"], ids=lambda p: p.name
)
def test_round_trip_is_lossless(tmp_path, source):
    """Real files (excluded responses, bytes offsets, token ids, cross-scores) survive."""
    s = load_samples(source)
    out = write_samples_packed(s, tmp_path / "s.npz")
    t = load_samples(out)
    assert t.source_format == "packed"
    _same_sets(s, t)
    with pytest.raises(FileExistsError):
        write_samples_packed(s, out)  # never overwrites silently


def test_ranking_from_packed_files_is_identical(tmp_path):
    a, b = load_pair(*(SHIPPED / f"{m}.jsonl" for m in ("smollm2-135m-instruct", "gemma-3-270m")))
    pa = write_samples_packed(a, tmp_path / "a.npz")
    pb = write_samples_packed(b, tmp_path / "b.npz")
    a2, b2 = load_pair(pa, pb)
    r1 = rank_prompts(a, b, n_bootstrap=200).to_json()
    r2 = rank_prompts(a2, b2, n_bootstrap=200).to_json()
    assert r1.pop("files") != r2.pop("files")
    assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True)


def test_cli_convert_writes_packed_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(["convert", str(GEMMA_JSON), str(out)]) == 0
    assert load_samples(out).source_format == "packed"
    assert main(["convert", str(GEMMA_JSON), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(GEMMA_JSON), str(out), "--overwrite"]) == 0


# ---------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def packed_arrays(tmp_path_factory) -> dict[str, np.ndarray]:
    p = write_samples_packed(load_samples(GEMMA_JSON), tmp_path_factory.mktemp("p") / "g.npz")
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def _write(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "bad.npz") -> Path:
    p = tmp_path / name
    with p.open("wb") as f:
        np.savez(f, **arrays)
    return p


def _meta(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(arrays["meta"].tobytes())


def _with_meta(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    return arrays | {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}


def _first_own(meta: dict) -> tuple[int, int, int]:
    """(record, response, start) of the first response with own scores."""
    for i, rec in enumerate(meta["records"]):
        for j, r in enumerate(rec["responses"]):
            if r["own"] is not None and r["own"][1] > 3:
                return i, j, r["own"][0]
    raise AssertionError("no scored response")


@pytest.mark.parametrize(
    "array,value,problem",
    [
        ("b0.logprobs", 0.5, "above 0"),
        ("b0.top_logprobs", np.nan, "NaN"),
        ("b0.ids", 10**8, "outside the string table"),
        ("b0.top_ids", -7, "outside the string table"),
    ],
)
def test_bad_values_name_record_response_and_token(tmp_path, packed_arrays, array, value, problem):
    meta = _meta(packed_arrays)
    rec, resp, start = _first_own(meta)
    arrays = {k: v.copy() for k, v in packed_arrays.items()}
    arrays[array][start + 2] = value
    with pytest.raises(SampleFileError, match=problem) as e:
        load_samples(_write(tmp_path, arrays))
    assert (e.value.record, f"response {resp}", "token 2") == (
        rec,
        *(s.strip() for s in str(e.value).split(":")[0].split(",")[2:4]),
    )
    assert "divscope convert" in str(e.value)


def test_span_outside_the_block_and_missing_array(tmp_path, packed_arrays):
    meta = _meta(packed_arrays)
    rec, resp, _ = _first_own(meta)
    meta["records"][rec]["responses"][resp]["own"][1] = 10**7
    with pytest.raises(SampleFileError, match="outside its") as e:
        load_samples(_write(tmp_path, _with_meta(packed_arrays, meta)))
    assert e.value.record == rec
    arrays = dict(packed_arrays)
    del arrays["b0.top_logprobs"]
    with pytest.raises(SampleFileError, match="'b0.top_logprobs' is missing"):
        load_samples(_write(tmp_path, arrays))
    meta = _meta(packed_arrays) | {"format": "something/else"}
    with pytest.raises(SampleFileError, match="expected 'divscope.samples-packed/1'"):
        load_samples(_write(tmp_path, _with_meta(packed_arrays, meta)))


def test_object_arrays_are_never_unpickled(tmp_path, packed_arrays):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    arrays = dict(packed_arrays) | {"b0.ids": np.array([Payload()], dtype=object)}
    with pytest.raises(SampleFileError, match="b0.ids"):
        load_samples(_write(tmp_path, arrays))
    assert not marker.exists()


def test_not_a_zip_and_a_single_array(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"not a zip at all")
    with pytest.raises(SampleFileError, match="not a readable .npz"):
        load_samples(p)
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    p.write_bytes(buf.getvalue())
    with pytest.raises(SampleFileError, match="single array"):
        load_samples(p)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=60_000), junk=st.binary(max_size=20))
def test_fuzz_truncated_and_corrupted_bytes(tmp_path, packed_arrays, cut, junk):
    raw = _write(tmp_path, packed_arrays, "src.npz").read_bytes()
    p = tmp_path / "t.npz"
    p.write_bytes(raw[:cut] + junk + raw[cut + len(junk) :] if cut % 2 else raw[:cut] + junk)
    try:
        load_samples(p)
    except SampleFileError as e:
        assert str(p) in str(e) and "Fix:" in str(e)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_meta(tmp_path, packed_arrays, data):
    """Any JSON value at any place of the meta record: a clean load or a SampleFileError."""
    meta = _meta(packed_arrays)
    node, path = meta, []
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    value = data.draw(
        st.one_of(
            st.none(), st.booleans(), st.integers(-5, 10**6), st.text(max_size=5), st.just([])
        )
    )
    if not path:
        meta = value
    else:
        cur = meta
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
    p = _write(tmp_path, _with_meta(packed_arrays, meta), "m.npz")
    try:
        load_samples(p)
    except SampleFileError as e:
        assert "Fix:" in str(e)


def test_zip_magic_without_the_suffix_is_still_read(tmp_path, packed_arrays):
    p = _write(tmp_path, packed_arrays, "samples.bin")
    assert zipfile.is_zipfile(p)
    assert load_samples(p).source_format == "packed"


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from divscope.runmeta import atomic_write_text

    umask = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(umask)
    assert (p.stat().st_mode & 0o777) == 0o644  # not mkstemp's private 0600
