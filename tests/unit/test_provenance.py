"""A tree exported with `git archive` (how the harness travels to a GPU machine with no .git) still names its commit."""

import shutil
import subprocess
import sys
from pathlib import Path

from tracking.provenance import archived_commit

REPO = Path(__file__).resolve().parents[2]


def git(*args, cwd, **kwargs):
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, env=env,
                          capture_output=True, check=True, **kwargs)


def test_a_git_archive_records_the_commit_it_was_made_from(tmp_path):
    """A repository of its own (the checkout CI runs in may be anything), with this tree's tracking package and
    .gitattributes: the archive of its commit must carry that commit, and the exported tree's provenance say so."""
    source, exported = tmp_path / "source", tmp_path / "exported"
    shutil.copytree(REPO / "tracking", source / "tracking", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitattributes", source / ".gitattributes")
    git("init", "-q", cwd=source)
    git("add", "-A", cwd=source)
    git("commit", "-q", "-m", "tree", cwd=source)
    head = git("rev-parse", "HEAD", cwd=source, text=True).stdout.strip()
    archive = git("archive", "HEAD", cwd=source).stdout
    exported.mkdir()
    subprocess.run(["tar", "x", "-C", str(exported)], input=archive, check=True)
    assert archived_commit(exported / "tracking" / "git_archival.txt") == head
    # The exported tree's provenance() (no .git anywhere above it) names it, and cannot know whether it was edited.
    code = "from tracking.provenance import provenance; g = provenance()['git']; print(g['commit'], g['dirty'])"
    shown = subprocess.run([sys.executable, "-c", code], cwd=exported, capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin", "GIT_CEILING_DIRECTORIES": str(tmp_path)})
    assert shown.stdout.split() == [head, "None"]


def test_an_unexported_file_names_no_commit(tmp_path):
    assert archived_commit(REPO / "tracking" / "git_archival.txt") is None  # the placeholder, not substituted
    assert archived_commit(tmp_path / "missing.txt") is None
