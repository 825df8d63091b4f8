"""git_commit: the commit of the code, dirty only for changes that count."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from divscope.runmeta import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_git_commit_dirty_unless_only_ignored_paths_changed(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == sha
    (tmp_path / "untracked.txt").write_text("not counted\n")
    assert git_commit(tmp_path) == sha

    (tmp_path / "results" / "r.json").write_text('{"a": 1}\n')
    assert git_commit(tmp_path) == sha + "-dirty"
    assert git_commit(tmp_path, ignore=("results",)) == sha
    # asked from a subfolder, the ignored path is still taken from the repository root
    assert git_commit(tmp_path / "sub", ignore=("results",)) == sha

    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path, ignore=("results",)) == sha + "-dirty"
    assert git_commit(tmp_path / "sub", ignore=("results",)) == sha + "-dirty"
    assert git_commit(tmp_path / "sub") == sha + "-dirty"


def test_csv_quotes_commas_and_neutralises_formulas(tmp_path):
    """A comma in a name stays in its column; a name a spreadsheet would run as a formula is
    written with a leading ' and read back unchanged."""
    import csv

    from divscope.runmeta import csv_text, read_csv

    names = ["a,b", '=HYPERLINK("x")', "+1", "-2", "@sum", 'quote "q"', "plain"]
    header = ["generator", "other", "js"]
    rows = [[n, "x\ny", 0.1 + i] for i, n in enumerate(names)]
    text = csv_text(header, rows)
    raw = list(csv.reader(text.splitlines(keepends=True)))
    assert all(len(r) == 3 for r in raw)
    assert not any(r[0].startswith(("=", "+", "-", "@")) for r in raw[1:])
    path = tmp_path / "t.csv"
    path.write_text(text)
    back = read_csv(path)
    assert [r["generator"] for r in back] == names
    assert [float(r["js"]) for r in back] == [0.1 + i for i in range(len(names))]
    assert back[0]["other"] == "x\ny"
