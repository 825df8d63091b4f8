"""The restricted unpickler admits plain builtins only and never runs anything."""

from __future__ import annotations

import os
import pickle

import pytest
from conftest import PKL

from divscope.samples import load_samples
from divscope.samples.errors import SampleFileError
from divscope.samples.safe_pickle import safe_load_pickle


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


def test_real_legacy_pickle_reads_as_plain_data():
    obj = safe_load_pickle(PKL)
    with PKL.open("rb") as f:
        trusted = pickle.load(f)  # our own checked-in test file: safe to compare against
    assert obj == trusted
    assert len(obj) == 2 and len(obj[0]["responses"]) == 10


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_of_plain_builtins(tmp_path, protocol):
    data = [{"a": (1, 2.5, True, None), "b": b"\x00\xffbytes", "c": ["x", -3]}]
    p = tmp_path / "plain.pkl"
    p.write_bytes(pickle.dumps(data, protocol=protocol))
    assert safe_load_pickle(p) == data


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(
        pickle.dumps([{"prompt": "x", "responses": [_Evil(str(marker))]}], protocol=protocol)
    )
    with pytest.raises(SampleFileError) as e:
        load_samples(p)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert "nothing in the file was run" in str(e.value)
    assert str(p) in str(e.value)
    assert not marker.exists()


def test_custom_class_instance_is_refused(tmp_path):
    p = tmp_path / "obj.pkl"
    p.write_bytes(pickle.dumps([_Plain()]))
    with pytest.raises(SampleFileError, match="_Plain"):
        safe_load_pickle(p)


def test_set_is_refused(tmp_path):
    p = tmp_path / "set.pkl"
    p.write_bytes(pickle.dumps([{1, 2}], protocol=2))  # sets pickle via builtins.set at protocol 2
    with pytest.raises(SampleFileError):
        safe_load_pickle(p)


def test_truncated_pickle(tmp_path):
    p = tmp_path / "cut.pkl"
    p.write_bytes(PKL.read_bytes()[:5000])
    with pytest.raises(SampleFileError, match="truncated or corrupt"):
        load_samples(p)
