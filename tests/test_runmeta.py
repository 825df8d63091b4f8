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
