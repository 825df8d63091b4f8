"""Hostile and careless input (issue 16): bounded reading, one clear error, outputs that fail
cleanly. Each test reproduces a failure of the code before the fix."""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import GEMMA_JSON

from divscope.bounded import (
    ArrayFileError,
    TooLarge,
    nested_size,
    open_npz,
    read_unit_arrays,
    write_unit_arrays,
)
from divscope.cli import main
from divscope.models.teacher_force import UnitScores
from divscope.personas.units import UnitCache
from divscope.samples import load_samples
from divscope.samples.errors import SampleFileError
from divscope.samples.safe_pickle import safe_load_pickle
from divscope.sampling.config import ConfigError, load_config


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _small_json(tmp_path: Path) -> Path:
    """The real Gemma file cut to 2 prompts x 20 tokens (fast to rank and convert)."""
    records = json.loads(GEMMA_JSON.read_text())[:2]
    for r in records:
        for resp in r["responses"]:
            c = resp["choices"][0]["logprobs"]
            c["content"] = c["content"][:20]
    p = tmp_path / "small.json"
    p.write_text(json.dumps(records))
    return p


def _rank_fails_cleanly(capsys, *argv: str) -> str:
    assert main(["rank", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("divscope: error: ") and "Traceback" not in err
    assert err.count("\n") == 1
    return err


# -- 9. the unpickler's work and memory are bounded by the file's size ----------------------


def test_shared_reference_pickle_is_refused_fast(tmp_path):
    """[x, x] nested 40 times: under 300 bytes, 2**41 objects to any reader walking it (the
    old check walked it as a tree and never finished)."""
    x: list = []
    for _ in range(40):
        x = [x, x]
    p = tmp_path / "shared.pkl"
    p.write_bytes(pickle.dumps(x, protocol=2))
    assert p.stat().st_size < 500
    t = time.perf_counter()
    with pytest.raises(SampleFileError, match="resource bomb") as e:
        safe_load_pickle(p)
    assert time.perf_counter() - t < 5 and str(p) in str(e.value)


def test_chained_codecs_pickle_is_refused_before_it_grows(tmp_path):
    """_codecs.encode chained through "hex" doubles its input per call: 40 calls in about
    1 kB would need 2**40 x 300 bytes. Only the (str, "latin1") form pickles use is admitted."""
    body = b"V" + b"x" * 300 + b"\n"
    for _ in range(40):
        body = b"c_codecs\nencode\n(" + body + b"Vhex\ntR"
    p = tmp_path / "codecs.pkl"
    p.write_bytes(b"(" + body + b"l.")
    before = _rss_mb()
    with pytest.raises(SampleFileError, match="only \\(str, 'latin1'\\)"):
        safe_load_pickle(p)
    assert _rss_mb() - before < 50


def test_bytes_in_old_protocols_still_read(tmp_path):
    data = [{"b": b"\x00\xff" * 50, "s": "x"}]
    for protocol in (0, 1, 2):
        p = tmp_path / f"p{protocol}.pkl"
        p.write_bytes(pickle.dumps(data, protocol=protocol))
        assert safe_load_pickle(p) == data


def test_nested_size_against_a_brute_force_walk():
    rng = np.random.default_rng(0)
    leaves = ["a", 1, 2.0, None]
    pool: list = list(leaves)
    for _ in range(60):  # random DAG: each new container references earlier objects
        kids = [pool[i] for i in rng.integers(0, len(pool), rng.integers(0, 4))]
        pool.append(kids if rng.random() < 0.5 else {f"k{i}": k for i, k in enumerate(kids)})

    def brute(x):
        if isinstance(x, dict):
            return 1 + sum(brute(k) + brute(v) for k, v in x.items())
        if isinstance(x, list | tuple):
            return 1 + sum(brute(v) for v in x)
        return 1

    for obj in pool[-10:]:
        n = brute(obj)
        assert nested_size(obj, max_nodes=n, max_depth=1000) == n
        if n > 1:
            with pytest.raises(TooLarge):
                nested_size(obj, max_nodes=n - 1, max_depth=1000)
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(TooLarge, match="levels deep"):
        nested_size(cyclic, max_nodes=10**9)


# -- 10. zip bombs and YAML alias bombs --------------------------------------------------------


def test_npz_zip_bomb_is_refused_before_inflating(tmp_path):
    """A deflated .npz of zeros: 2 MB that declares 2 GB. Refused from its headers."""
    p = tmp_path / "bomb.npz"
    zf = zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9)
    with zf, zf.open("meta.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<u1", "fortran_order": False, "shape": (2 * 2**30,)}
        )
        chunk = bytes(2**24)
        for _ in range(128):
            f.write(chunk)
    assert p.stat().st_size < 4 * 2**20
    before = _rss_mb()
    with pytest.raises(ArrayFileError, match="zip bomb"):
        open_npz(p)
    assert _rss_mb() - before < 100
    with pytest.raises(SampleFileError, match="zip bomb"):
        load_samples(p)


def test_npz_header_larger_than_its_member_is_refused(tmp_path):
    p = tmp_path / "lie.npz"
    with zipfile.ZipFile(p, "w") as z, z.open("meta.npy", "w") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
        )
        f.write(bytes(64))
    with pytest.raises(ArrayFileError, match="declares"):
        open_npz(p)


def test_yaml_alias_bomb_is_refused(tmp_path):
    """Nine levels of nine aliases: under 1 kB of YAML, 9**9 (387 million) strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nmodels: [m]\n")
    assert p.stat().st_size < 1000
    before = _rss_mb()
    with pytest.raises(ConfigError, match="resource bomb"):
        load_config(p)
    assert _rss_mb() - before < 50


# -- 11. sample files: one clear error, never a traceback ----------------------------------


def test_huge_integer_in_a_sample_file(tmp_path, capsys):
    p = _small_json(tmp_path)
    bad = tmp_path / "bigint.json"
    bad.write_text(p.read_text().replace('"created": ', '"created": ' + "9" * 5000 + ', "x":', 1))
    err = _rank_fails_cleanly(capsys, str(bad), str(p))
    assert "bigint.json" in err and "5000 digits" in err


def test_lone_surrogate_is_printed_escaped_and_written_losslessly(tmp_path, capsys):
    p = _small_json(tmp_path)
    text = p.read_text().replace('"prompt": "', '"prompt": "\\ud800\\u001b[31m', 1)
    bad = tmp_path / "surrogate.json"
    bad.write_text(text.replace('"token": "', '"token": "\\udc01', 1))
    assert main(["rank", str(bad), str(bad), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "\\ud800\\x1b[31m" in out and "\x1b" not in out
    for name in ("s.jsonl", "s.npz"):
        assert main(["convert", str(bad), str(tmp_path / name)]) == 0
        back = load_samples(tmp_path / name)
        assert back.records[0].prompt.startswith("\ud800\x1b[31m")
        tokens = back.records[0].responses[0].scores.tokens
        assert tokens[0].startswith("\udc01")


def test_npz_member_that_is_a_raw_pickle(tmp_path, capsys):
    p = _small_json(tmp_path)
    packed = tmp_path / "s.npz"
    assert main(["convert", str(p), str(packed)]) == 0
    bad = tmp_path / "pickled.npz"
    with zipfile.ZipFile(packed) as zi, zipfile.ZipFile(bad, "w") as zo:
        for info in zi.infolist():
            data = pickle.dumps({"x": 1}) if info.filename == "meta.npy" else zi.read(info)
            zo.writestr(info.filename, data)
    capsys.readouterr()
    err = _rank_fails_cleanly(capsys, str(bad), str(p))
    assert "pickled.npz" in err and "meta.npy" in err and "no valid .npy header" in err


@pytest.mark.parametrize("where", ["own", "index"])
def test_out_of_range_numbers_in_a_packed_file(tmp_path, capsys, where):
    p = _small_json(tmp_path)
    packed = tmp_path / "s.npz"
    assert main(["convert", str(p), str(packed)]) == 0
    with np.load(packed) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes())
    rec = meta["records"][0]
    if where == "own":
        rec["responses"][0]["own"][0] = 10**30
    else:
        rec["index"] = 10**30
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    capsys.readouterr()
    err = _rank_fails_cleanly(capsys, str(bad), str(p))
    assert "bad.npz, record 0" in err and "out of range" in err


# -- 8. cache units are checked on load -------------------------------------------------------


def _unit(n: int = 3, hidden: bool = True) -> UnitScores:
    rng = np.random.default_rng(0)
    h = rng.normal(size=(n, 2, 4)).astype(np.float32) if hidden else None
    js = rng.random(n).astype(np.float32)
    return UnitScores(js, js * 2, js * 3, 7, h)


def test_unit_round_trip_and_every_kind_of_damage(tmp_path):
    path = tmp_path / "unit_0123abcd.npz"
    UnitCache.write(path, _unit())
    got = UnitCache.read(path, hidden=True, n_personas=3)
    np.testing.assert_array_equal(got.js, _unit().js)
    assert got.n_tokens == 7 and got.hidden.shape == (3, 2, 4)

    def damaged(name: str, edit) -> Path:  # noqa: ANN001
        p = tmp_path / name
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        edit(arrays)
        np.savez(p, **arrays)
        return p

    cases = {
        "truncated": (tmp_path / "unit_t.npz", None),
        "edited value": (damaged("unit_e.npz", lambda a: a["js"].__setitem__(0, 0.5)), None),
        "NaN": (damaged("unit_n.npz", lambda a: a["kl_fwd"].__setitem__(1, np.nan)), None),
        "wrong shape": (damaged("unit_s.npz", lambda a: a.update(js=a["js"][:2])), None),
        "missing array": (damaged("unit_m.npz", lambda a: a.pop("kl_rev")), None),
    }
    cases["truncated"][0].write_bytes(path.read_bytes()[:200])
    renamed = tmp_path / "unit_ffff0000.npz"  # a valid unit under another unit's key
    shutil.copy(path, renamed)
    cases["renamed"] = (renamed, None)
    for what, (p, _) in cases.items():
        with pytest.warns(UserWarning, match=str(p.name)) as w:
            assert UnitCache.read(p, hidden=True, n_personas=3) is None, what
        assert "recomputing" in str(w[0].message), what
    with pytest.warns(UserWarning, match="expected"):  # 3 personas stored, 4 expected
        assert UnitCache.read(path, hidden=True, n_personas=4) is None


def test_unit_arrays_checksum_covers_content_and_key(tmp_path):
    p = tmp_path / "u.npz"
    arrays = {"a": np.arange(5, dtype=np.float32), "b": np.array(3)}
    write_unit_arrays(p, "key1", arrays)
    spec = {"a": ("f", (-1,)), "b": ("iu", ())}
    got = read_unit_arrays(p, "key1", spec)
    np.testing.assert_array_equal(got["a"], arrays["a"])
    with pytest.raises(ArrayFileError, match="checksum"):
        read_unit_arrays(p, "key2", spec)


# -- 12. outputs that cannot be written: one clear error, before any work --------------------


def test_json_output_that_is_a_directory_or_under_a_file(tmp_path, capsys):
    p = _small_json(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    for target, overwrite, needle in (
        ("adir", False, "is a directory"),
        ("adir", True, "is a directory"),
        ("afile/x.json", True, "is a file, not a folder"),
        ("afile/sub/x.json", False, "is a file, not a folder"),
    ):
        extra = ["--overwrite"] if overwrite else []
        err = _rank_fails_cleanly(capsys, str(p), str(p), "--json", str(tmp_path / target), *extra)
        assert needle in err and "--overwrite" not in err
        assert capsys.readouterr().out == ""  # refused before computing anything


def test_existing_json_is_refused_before_the_table_is_computed(tmp_path, capsys):
    p = _small_json(tmp_path)
    out = tmp_path / "r.json"
    out.write_text("{}")
    _rank_fails_cleanly(capsys, str(p), str(p), "--json", str(out))
    assert capsys.readouterr().out == "" and out.read_text() == "{}"


_UNSHARE = shutil.which("unshare")


def _in_private_mounts(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_UNSHARE, "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(_UNSHARE is None, reason="unshare is not available")
def test_read_only_and_full_file_systems(tmp_path):
    """Real file systems: a read-only tmpfs and a 16 kB one, in a private mount namespace."""
    probe = _in_private_mounts("mount -t tmpfs -o size=1m tmpfs /mnt")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount here: {probe.stderr.strip()}")
    p = _small_json(tmp_path)
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir(), full.mkdir()
    cmd = f"{sys.executable} -m divscope"
    r = _in_private_mounts(
        f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && mount -t tmpfs -o size=16k tmpfs {full} && "
        f"{cmd} rank {p} {p} --json {ro}/r.json; echo rc=$?; "
        f"{cmd} convert {p} {full}/s.jsonl; echo rc=$?; ls -A {full}"
    )
    errors = r.stderr.splitlines()
    assert len(errors) == 2 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].endswith(
        "ro/r.json: the file system is read-only. Fix: write to a writable place"
    )
    assert "s.jsonl: the disk is full" in errors[1]
    assert r.stdout.split() == ["rc=2", "rc=2"]  # and `ls` found nothing: no partial file, no tmp


# -- 13. configs: one clear error at load time -------------------------------------------------


def _config(tmp_path: Path, model: str = "", dataset: str = "p.jsonl", base: str = "out") -> Path:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    p = tmp_path / "c.yaml"
    p.write_text(
        f'models:\n  - {{name: m, model: m, base_url: "http://127.0.0.1:9/v1"{model}}}\n'
        f"dataset: {{source: local, path: {dataset}}}\n"
        f"output: {{base_dir: {base}, experiment_name: x}}\n"
    )
    return p


@pytest.mark.parametrize(
    "model, needle",
    [
        (", api_key_env: 5", "api_key_env: 5 is not of type"),
        (", chat_template: [1]", "chat_template"),
    ],
)
def test_config_field_types(tmp_path, model, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(_config(tmp_path, model=model))


def test_config_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"models: [m]\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_config_base_dir_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output.base_dir: afile is a file"):
        load_config(_config(tmp_path, base="afile"))


@pytest.mark.parametrize("kind", ["directory", "binary", "junk gguf"])
def test_sample_refuses_bad_files_named_in_the_config(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(128, 256)))
    (tmp_path / "junk.gguf").write_bytes(bytes(range(256)))
    model, dataset = {
        "directory": (", chat_template: chatml", "adir"),
        "binary": (", chat_template: chatml", "bin.jsonl"),
        "junk gguf": (", chat_template: junk.gguf", "p.jsonl"),
    }[kind]
    cfg = _config(tmp_path, model=model, dataset=dataset)
    assert main(["sample", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("divscope: error: ") and "Traceback" not in err
    assert {"directory": "is a directory", "binary": "not UTF-8", "junk gguf": "GGUF"}[kind] in err
    assert not (tmp_path / "out").exists()  # nothing created for a run that cannot start


def test_safetensors_header_over_the_format_limit_is_refused(tmp_path):
    """A (sparse) weight file whose header length is over safetensors' cap: refused from its
    first 8 bytes, the header not read (neither by the check nor for its identity)."""
    from divscope.models.checks import MAX_HEADER, safetensors_header, safetensors_problem
    from divscope.models.load import file_identity

    f = tmp_path / "model.safetensors"
    n = MAX_HEADER + 1
    with f.open("wb") as fh:
        fh.write(n.to_bytes(8, "little") + b"{")
        fh.truncate(8 + n + 16)
    assert "over the format's" in safetensors_problem(f)
    head, body = safetensors_header(f)
    assert len(head) == 8 and body == b""
    assert len(file_identity(f)["header_sha256"]) == 64
