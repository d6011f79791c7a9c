"""Where a model version's code came from: the git commit of the skumatch checkout that trained it.

Recorded on every registered version beside its data version and flow run, so a version can be
traced back to the code, and rebuilt from it. MLflow tags runs with the commit of the script it
started from; the flow runs inside a Prefect worker, so the commit is read here, from the tree
this package was imported from, with GitPython (which MLflow uses too).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = "unknown"


def code_version(root: str | Path = PACKAGE_ROOT) -> dict[str, str]:
    """``{"git_commit": sha, "git_dirty": "true" | "false"}`` of the git tree holding ``root``.

    Dirty means tracked files differ from the commit (untracked files do not count). Both are
    ``"unknown"`` outside a git tree, for example for a package installed from a wheel.
    """
    import git

    try:
        repo = git.Repo(root, search_parent_directories=True)
        return {"git_commit": repo.head.commit.hexsha, "git_dirty": str(repo.is_dirty()).lower()}
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):
        # ValueError: a repository with no commit yet.
        return {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}
