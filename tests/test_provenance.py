"""A tree exported with `git archive` (how the harness travels to a GPU machine with no .git) still names its commit."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracking.provenance import archived_commit

REPO = Path(__file__).resolve().parent.parent


def test_a_git_archive_records_the_commit_it_was_made_from(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("this test needs the git checkout it runs from")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "HEAD", "tracking"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(tmp_path)], input=archive, check=True)
    assert archived_commit(tmp_path / "tracking" / "git_archival.txt") == head
    # The exported tree's own provenance() says so too (no .git above it), and cannot know whether it was edited.
    code = "from tracking.provenance import provenance; g = provenance()['git']; print(g['commit'], g['dirty'])"
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert shown.stdout.split() == [head, "None"]


def test_an_unexported_file_names_no_commit(tmp_path):
    assert archived_commit(REPO / "tracking" / "git_archival.txt") is None  # the placeholder, not substituted
    assert archived_commit(tmp_path / "missing.txt") is None
