"""Bring datasets under DVC: ``dvc add`` a folder already on disk, ``dvc import`` one from a registry.

Both go through DVC's Python API (``dvc.repo.Repo``), not the command line, so errors arrive
as exceptions we can translate into :class:`DataVersioningError` messages that say what to
fix. Both return the DVC md5 that the ``.dvc`` file records (``<hash>.dir`` for a folder),
the same value :func:`components.data.data_version` returns for the path, so a run's recorded
data version does not depend on whether the data was added before or after the run.

Paths given relative are read against ``repo_root``, not the process's working directory,
so a flow can pass ``data/shop`` from ``params.yaml`` wherever it runs.

DVC is imported inside the functions: ``tracked_version`` needs only the ``.dvc`` file, and
importing this module stays cheap for stages that never touch DVC.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from dvc.repo import Repo

LOGGER = logging.getLogger(__name__)

DVC_FILE_SUFFIX = ".dvc"
# scp-like git addresses (git@github.com:org/repo.git) name a remote repo without a scheme.
_SCP_LIKE_URL = re.compile(r"^[\w.+-]+@[\w.-]+:")


class DataVersioningError(RuntimeError):
    """A dataset could not be added to, imported into or read from DVC; the message says why."""


def tracked_version(path: str | Path) -> str | None:
    """The md5 recorded in ``<path>.dvc``, or None when the path is not DVC-tracked.

    Only the ``outs`` entry for ``path`` counts: an import's ``.dvc`` file also carries a
    top-level ``md5`` (the hash of the stage itself), which is not the data's version.

    Args:
        path: the tracked file or folder (not the ``.dvc`` file), relative to the working
            directory or absolute.

    Returns:
        The recorded md5 (``<hash>.dir`` for a folder), or None when ``<path>.dvc`` does not
        exist or records no md5 for ``path`` (e.g. an import made with ``--no-download``).

    Raises:
        DataVersioningError: ``<path>.dvc`` exists but is not a readable DVC file.
    """
    target = Path(path).expanduser().resolve()
    if not target.name:  # the filesystem root has no sibling .dvc file
        return None
    dvc_file = _dvc_file(target)
    if not dvc_file.is_file():
        return None
    try:
        content = yaml.safe_load(dvc_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataVersioningError(f"cannot read DVC file {dvc_file}: {_reason(err)}") from err
    outs = content.get("outs") if isinstance(content, dict) else None
    if not isinstance(outs, list):
        raise DataVersioningError(f"DVC file {dvc_file} has no 'outs' list; is it a DVC 3 .dvc file?")
    for out in outs:
        # Out paths are relative to the .dvc file's folder; match by location, not by name.
        if isinstance(out, dict) and out.get("path") and (dvc_file.parent / str(out["path"])).resolve() == target:
            md5 = out.get("md5")
            if md5:
                return str(md5)
    LOGGER.debug("%s records no md5 for %s", dvc_file, target)
    return None


def add_dataset(path: str | Path, repo_root: str | Path = ".", push: bool = False) -> str:
    """``dvc add`` a dataset folder (or file) that lies inside ``repo_root``.

    Adding an already tracked, unchanged path is a no-op that returns the same md5; adding
    it after a change records the new version.

    Args:
        path: the dataset, typically under ``data/``; a relative path is read against
            ``repo_root``.
        repo_root: the DVC repo (or a folder inside it: the repo is found upward, as the
            ``dvc`` command does).
        push: also push the dataset to the repo's default DVC remote.

    Returns:
        The DVC md5 recorded in ``<path>.dvc`` (``<hash>.dir`` for a folder).

    Raises:
        DataVersioningError: ``repo_root`` is not a DVC repo, ``path`` is missing or outside
            the repo, DVC refuses to track it (e.g. it is git-tracked or overlaps another
            output), or the push fails (the dataset stays added in that case).
    """
    from dvc.exceptions import DvcException

    with _open_repo(repo_root) as repo:
        root = Path(repo.root_dir).resolve()
        target = _resolve(path, repo_root)
        _require_inside(target, root, "path to add")
        if not target.exists():
            raise DataVersioningError(f"dataset path {target} does not exist")
        rel = target.relative_to(root).as_posix()
        LOGGER.info("dvc add %s (repo %s)", rel, root)
        try:
            repo.add(str(target))
        except DvcException as err:
            raise DataVersioningError(f"`dvc add {rel}` failed in {root}: {_reason(err)}") from err
        md5 = _recorded_md5(target)
        LOGGER.info("%s is at version %s; commit %s to git", rel, md5, _dvc_file(target).relative_to(root))
        if push:
            _push(repo, target, rel, md5)
    return md5


def import_dataset(
    url: str,
    path: str,
    out: str | Path,
    repo_root: str | Path = ".",
    rev: str | None = None,
) -> str:
    """``dvc import url path -o out``: copy a DVC-tracked dataset from another git repo.

    The data comes from the source's default DVC remote, or from its cache when the source
    is a local repo without a remote (DVC's own rule: a source that has a remote is read
    from that remote only, so its data must have been pushed). Importing again into an
    ``out`` that already holds an import of the same ``url`` and ``path`` runs
    ``dvc update`` instead: it moves to ``rev`` (or to the newest commit of the revision
    first imported) and returns the new md5.

    Args:
        url: the source git repo: a URL (``https://...``, ``git@host:org/repo``) or a local
            path, which is recorded absolute so the ``.dvc`` file does not depend on the
            working directory.
        path: the DVC-tracked (or git-tracked) path inside the source repo.
        out: where the data goes in this repo; a relative path is read against
            ``repo_root``. Missing parent folders are created.
        repo_root: the consuming DVC repo (or a folder inside it).
        rev: a git branch, tag or commit of the source; None for its default branch.

    Returns:
        The imported data's md5 as recorded in ``<out>.dvc``; it equals the md5 in the
        source's own ``.dvc`` file for ``path``.

    Raises:
        DataVersioningError: ``repo_root`` is not a DVC repo, ``out`` is outside it or already
            holds something else, the source is missing or not a git repo, ``rev`` or
            ``path`` is not in the source, or the data cannot be fetched.
    """
    source = _normalise_source(url)
    with _open_repo(repo_root) as repo:
        root = Path(repo.root_dir).resolve()
        target = _resolve(out, repo_root)
        _require_inside(target, root, "import output")
        rel = target.relative_to(root).as_posix()
        described = f"{path} from {source}" + (f"@{rev}" if rev else "")
        if _is_same_import(_dvc_file(target), source, path):
            LOGGER.info("%s already imports %s; updating it (dvc update)", rel, described)
            with _translate_import_errors(source, path, rev), _clean_erepo_clones():
                repo.update([str(_dvc_file(target))], rev=rev)
        else:
            _first_import(repo, source, path, target, rev)
        md5 = _recorded_md5(target)
    LOGGER.info("%s is at version %s; commit %s to git", rel, md5, _dvc_file(target).relative_to(root))
    return md5


def _first_import(repo: Repo, source: str, path: str, target: Path, rev: str | None) -> None:
    """``dvc import`` into ``target``, which must not exist yet; leaves no empty folder behind on failure."""
    root = Path(repo.root_dir).resolve()
    rel = target.relative_to(root).as_posix()
    if target.exists() or _dvc_file(target).exists():
        # DVC would nest the import inside an existing folder (out/<name>) or refuse
        # a file; neither is what the caller asked for.
        raise DataVersioningError(
            f"import output {rel} already exists in {root} and is not an import of {path} "
            f"from {source}; remove it (and {rel}{DVC_FILE_SUFFIX}) or choose another out"
        )
    created = _make_parents(target.parent)  # DVC refuses a missing stage folder
    LOGGER.info("dvc import %s%s -> %s (repo %s)", f"{path} from {source}", f"@{rev}" if rev else "", rel, root)
    try:
        with _translate_import_errors(source, path, rev), _clean_erepo_clones():
            repo.imp(source, path, out=str(target), rev=rev)
    except DataVersioningError:
        _remove_empty(created)
        raise


@contextmanager
def _open_repo(repo_root: str | Path) -> Iterator[Repo]:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    root = Path(repo_root).expanduser().resolve()
    if not root.is_dir():
        raise DataVersioningError(f"not a DVC repo: {root} (no such folder)")
    try:
        repo = Repo(str(root))
    except NotDvcRepoError as err:
        raise DataVersioningError(f"not a DVC repo: {root} (run `dvc init` there)") from err
    try:
        yield repo
    finally:
        repo.close()


def _resolve(path: str | Path, base: str | Path) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = Path(base).expanduser() / candidate
    return candidate.resolve()


def _require_inside(target: Path, root: Path, what: str) -> None:
    if target == root or not target.is_relative_to(root):
        raise DataVersioningError(f"{what} must be inside the repo {root} (and not the repo itself): {target}")


def _dvc_file(target: Path) -> Path:
    return target.with_name(target.name + DVC_FILE_SUFFIX)


def _recorded_md5(target: Path) -> str:
    md5 = tracked_version(target)
    if md5 is None:
        # DVC reported success; a .dvc file without the md5 means our reading of it is wrong.
        raise DataVersioningError(f"DVC wrote no md5 for {target} in {_dvc_file(target)}")
    return md5


def _push(repo: Repo, target: Path, rel: str, md5: str) -> None:
    from dvc.config import NoRemoteError
    from dvc.exceptions import DvcException

    try:
        transferred = repo.push(targets=[str(target)])
    except NoRemoteError as err:
        raise DataVersioningError(
            f"added {rel} (md5 {md5}) but cannot push it: {repo.root_dir} has no default DVC remote "
            "(run `dvc remote add -d <name> <url>`)"
        ) from err
    except DvcException as err:
        raise DataVersioningError(f"added {rel} (md5 {md5}) but `dvc push` failed: {_reason(err)}") from err
    LOGGER.info("pushed %s to the default remote (%d files transferred)", rel, transferred)


def _normalise_source(url: str) -> str:
    """Check a local import source up front; DVC's own errors for it are vague ('SCM error')."""
    if "://" in url or _SCP_LIKE_URL.match(url):
        return url  # a remote repo: only cloning it can tell whether it is one
    source = Path(url).expanduser().resolve()
    if not source.exists():
        raise DataVersioningError(f"import source {source} does not exist")
    is_worktree = (source / ".git").exists()
    is_bare = (source / "HEAD").is_file() and (source / "objects").is_dir()
    if not (is_worktree or is_bare):
        raise DataVersioningError(
            f"import source {source} is not a git repo (its root has no .git); "
            "dvc import reads the source's committed .dvc files, so it must be the root of a git repo"
        )
    return str(source)


def _is_same_import(dvc_file: Path, source: str, path: str) -> bool:
    if not dvc_file.is_file():
        return False
    try:
        content = yaml.safe_load(dvc_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # not ours to judge here; the caller reports the path as taken
    deps = content.get("deps") if isinstance(content, dict) else None
    if not isinstance(deps, list) or len(deps) != 1 or not isinstance(deps[0], dict):
        return False
    repo_info = deps[0].get("repo") or {}
    return repo_info.get("url") == source and str(deps[0].get("path", "")).strip("/") == path.strip("/")


@contextmanager
def _translate_import_errors(source: str, path: str, rev: str | None) -> Iterator[None]:
    from dvc.exceptions import DvcException
    from dvc.scm import CloneError, NoSCMError, RevError
    from dvc_data.index.index import DataIndexError

    at = f"{source}@{rev}" if rev else source
    try:
        yield
    except RevError as err:
        raise DataVersioningError(f"revision {rev!r} not found in import source {source}: {_reason(err)}") from err
    except (CloneError, NoSCMError) as err:
        raise DataVersioningError(
            f"import source {source} is not a git repo DVC can clone, or cannot be reached: {_reason(err)}"
        ) from err
    except FileNotFoundError as err:
        # DVC raises a bare FileNotFoundError(['<path>']) when the path is in neither the
        # source's .dvc files nor its git tree.
        hint = "" if _looks_like_dvc_repo(source) else " (the source is not a DVC repo: it has no .dvc folder)"
        raise DataVersioningError(
            f"{path} not found in import source {at}: it is neither DVC- nor git-tracked there "
            f"at that revision; is its .dvc file committed?{hint}"
        ) from err
    except DataIndexError as err:
        raise DataVersioningError(
            f"cannot fetch the data of {path} from import source {at}: {_reason(err)}; a source with a DVC "
            "remote is read from that remote only, so run `dvc push` in the source"
        ) from err
    except DvcException as err:
        raise DataVersioningError(f"`dvc import {at} {path}` failed: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """The error's message followed by its causes': DVC's SCM errors say only "SCM error"."""
    messages: list[str] = []
    current: BaseException | None = err
    while current is not None and len(messages) < 3:
        text = str(current).strip()
        if text and text != "SCM error" and text not in messages:
            messages.append(text if len(text) <= 300 else text[:297] + "...")
        current = current.__cause__
    return ": ".join(messages) or type(err).__name__


def _looks_like_dvc_repo(source: str) -> bool:
    local = Path(source)
    # A remote URL cannot be inspected without cloning; do not claim it lacks DVC.
    return not local.is_absolute() or (local / ".dvc").is_dir()


@contextmanager
def _clean_erepo_clones() -> Iterator[None]:
    """Remove the temporary clones and caches DVC keeps for imported repos.

    The ``dvc`` command removes them on exit; a library caller never exits, so without this
    every import leaves a clone and a cache under the temp folder. DVC keeps them in
    process-wide state, so concurrent imports in threads of one process must not overlap.
    """
    from dvc.repo.open_repo import clean_repos

    try:
        yield
    finally:
        clean_repos()


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing  # deepest first, the order to remove them in


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (DVC wrote something) or already gone: leave the rest
