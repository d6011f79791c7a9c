"""dvc add / dvc import of datasets, against real git and real DVC repos in temp folders.

A "registry" repo holds a tiny ImageFolder dataset tracked by DVC and pushed to a local
remote; "consumer" repos import from it or add their own folders. Nothing is mocked: the
md5s compared are the ones DVC writes into .dvc files.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from components.data import data_version, load_manifest
from components.dvc_data_ops import DataVersioningError, add_dataset, import_dataset, tracked_version

SKUS = ("sku-a", "sku-b")


@pytest.fixture(scope="module", autouse=True)
def _isolated_env(tmp_path_factory):
    """Keep DVC and git away from the developer's config, telemetry and site cache."""
    home = tmp_path_factory.mktemp("env")
    gitconfig = home / "gitconfig"
    # A developer's global commit.gpgsign or hooks must not break the test commits.
    gitconfig.write_text(
        "[user]\n\tname = skumatch tests\n\temail = tests@skumatch.invalid\n[commit]\n\tgpgsign = false\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_NO_ANALYTICS", "1")
        patch.setenv("DVC_GLOBAL_CONFIG_DIR", str(home / "dvc-global"))
        patch.setenv("DVC_SYSTEM_CONFIG_DIR", str(home / "dvc-system"))
        patch.setenv("DVC_SITE_CACHE_DIR", str(home / "dvc-site-cache"))
        patch.setenv("GIT_CONFIG_GLOBAL", str(gitconfig))
        patch.setenv("GIT_CONFIG_NOSYSTEM", "1")
        yield


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _make_images(folder: Path, per_sku: int = 2, offset: int = 0) -> None:
    """A few 8x8 PNGs in <sku>/<image> folders, each a distinct colour so each hashes apart."""
    for s, sku in enumerate(SKUS):
        (folder / sku).mkdir(parents=True, exist_ok=True)
        for i in range(offset, offset + per_sku):
            Image.new("RGB", (8, 8), (40 * s, 20 * i, 7)).save(folder / sku / f"{i}.png")


def _init_repo(root: Path, remote: Path | None = None) -> None:
    """git init + dvc init, analytics off, and optionally a default local remote."""
    from dvc.repo import Repo

    root.mkdir(parents=True, exist_ok=True)
    _git(root, "init", "-q")
    repo = Repo.init(str(root))
    try:
        with repo.config.edit() as config:
            config["core"]["analytics"] = False
            if remote is not None:
                config["core"]["remote"] = "store"
                config["remote"]["store"] = {"url": str(remote)}
    finally:
        repo.close()


def _recorded_md5(dvc_file: Path) -> str:
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@dataclass
class Registry:
    root: Path
    remote: Path

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "shop"

    def commit(self, message: str) -> str:
        _git(self.root, "add", "-A")
        _git(self.root, "commit", "-q", "-m", message)
        return _git(self.root, "rev-parse", "HEAD")

    def add(self, push: bool = True) -> str:
        """Track data/shop with DVC's own API (not the code under test) and return its md5."""
        from dvc.repo import Repo

        repo = Repo(str(self.root))
        try:
            repo.add(str(self.dataset))
            if push:
                repo.push()
        finally:
            repo.close()
        return _recorded_md5(self.dataset.with_name("shop.dvc"))


def _build_registry(base: Path, with_remote: bool = True, push: bool = True) -> Registry:
    registry = Registry(root=base / "registry", remote=base / "registry-remote")
    _init_repo(registry.root, registry.remote if with_remote else None)
    _make_images(registry.dataset)
    registry.add(push=push and with_remote)
    registry.commit("add shop dataset")
    return registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """A pushed registry that tests only read from (building one costs about a second)."""
    return _build_registry(tmp_path_factory.mktemp("shared"))


@pytest.fixture
def consumer(tmp_path) -> Path:
    root = tmp_path / "consumer"
    _init_repo(root, tmp_path / "consumer-remote")
    return root


# --- import_dataset -----------------------------------------------------------------------


def test_import_dataset_copies_data_and_records_source_md5(registry, consumer):
    md5 = import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=consumer)

    imported = consumer / "data" / "shop"
    assert _files(imported) == _files(registry.dataset)
    source_md5 = _recorded_md5(registry.root / "data" / "shop.dvc")
    assert md5 == source_md5
    assert md5.endswith(".dir")
    assert data_version(imported) == md5
    assert tracked_version(imported) == md5

    dvc_file = yaml.safe_load((consumer / "data" / "shop.dvc").read_text())
    assert dvc_file["frozen"] is True
    assert dvc_file["deps"][0]["repo"]["url"] == str(registry.root)
    assert dvc_file["deps"][0]["repo"]["rev_lock"] == _git(registry.root, "rev-parse", "HEAD")
    assert "/shop" in (consumer / "data" / ".gitignore").read_text()

    manifest = load_manifest(imported)
    assert len(manifest) == 4
    assert set(manifest["sku_id"]) == set(SKUS)
    assert set(manifest["split"]) == {"train"}


def test_import_dataset_pins_rev_and_reimport_updates(tmp_path, consumer):
    registry = _build_registry(tmp_path)
    first_rev = _git(registry.root, "rev-parse", "HEAD")
    v1 = import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=consumer)

    _make_images(registry.dataset, per_sku=1, offset=5)  # a new image per SKU
    v2 = registry.add()
    registry.commit("more images")
    assert v2 != v1

    # Importing again into the same out is `dvc update`: it moves to the new commit.
    assert import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=consumer) == v2
    assert len(_files(consumer / "data" / "shop")) == 6
    assert tracked_version(consumer / "data" / "shop") == v2

    # A pinned revision gets the data as it was then; a relative out is read against repo_root.
    pinned = import_dataset(str(registry.root), "data/shop", "data/pinned/shop", repo_root=consumer, rev=first_rev)
    assert pinned == v1
    assert len(_files(consumer / "data" / "pinned" / "shop")) == 4
    pinned_file = yaml.safe_load((consumer / "data" / "pinned" / "shop.dvc").read_text())
    assert pinned_file["deps"][0]["repo"]["rev"] == first_rev


def test_import_dataset_from_source_without_remote_reads_its_cache(tmp_path, consumer):
    registry = _build_registry(tmp_path, with_remote=False)

    md5 = import_dataset(str(registry.root), "data/shop", consumer / "data" / "shop", repo_root=consumer)

    assert md5 == _recorded_md5(registry.root / "data" / "shop.dvc")
    assert _files(consumer / "data" / "shop") == _files(registry.dataset)


def test_import_dataset_unpushed_source_says_to_push(tmp_path, consumer):
    registry = _build_registry(tmp_path, with_remote=True, push=False)

    with pytest.raises(DataVersioningError, match="dvc push") as caught:
        import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=consumer)
    assert caught.value.__cause__ is not None
    assert not (consumer / "data" / "shop.dvc").exists()


# --- add_dataset --------------------------------------------------------------------------


def test_add_dataset_matches_data_version_and_pushes(consumer):
    dataset = consumer / "data" / "new"
    _make_images(dataset)
    before = data_version(dataset)  # what a run records when the data is not added yet

    md5 = add_dataset("data/new", repo_root=consumer, push=True)

    assert md5 == before
    assert md5.endswith(".dir")
    assert tracked_version(dataset) == md5 == data_version(dataset)
    assert _recorded_md5(consumer / "data" / "new.dvc") == md5
    assert "/new" in (consumer / "data" / ".gitignore").read_text()
    pushed = consumer.parent / "consumer-remote" / "files" / "md5"
    assert (pushed / md5[:2] / md5[2:]).is_file()  # the .dir listing
    assert len([p for p in pushed.rglob("*") if p.is_file()]) == 4 + 1


def test_add_dataset_again_records_new_version_only_after_change(consumer):
    dataset = consumer / "data" / "new"
    _make_images(dataset)
    first = add_dataset(dataset, repo_root=consumer)
    assert add_dataset(dataset, repo_root=consumer) == first

    _make_images(dataset, per_sku=1, offset=9)
    # data_version(dataset) would still read the stale .dvc file; hash an untracked copy.
    expected = data_version(shutil.copytree(dataset, consumer.parent / "copy"))
    second = add_dataset(dataset, repo_root=consumer)
    assert second == expected != first
    assert tracked_version(dataset) == second
    assert not (consumer.parent / "consumer-remote").exists()  # nothing pushed unless asked


# --- errors -------------------------------------------------------------------------------


def test_add_dataset_outside_dvc_repo(tmp_path):
    _make_images(tmp_path / "plain" / "data")
    with pytest.raises(DataVersioningError, match="not a DVC repo") as caught:
        add_dataset("data", repo_root=tmp_path / "plain")
    assert "dvc init" in str(caught.value)
    assert type(caught.value.__cause__).__name__ == "NotDvcRepoError"


def test_add_dataset_path_outside_repo(tmp_path, consumer):
    _make_images(tmp_path / "elsewhere")
    with pytest.raises(DataVersioningError, match="path to add must be inside the repo"):
        add_dataset(tmp_path / "elsewhere", repo_root=consumer)
    with pytest.raises(DataVersioningError, match="must be inside the repo"):
        add_dataset(".", repo_root=consumer)


def test_add_dataset_missing_path(consumer):
    with pytest.raises(DataVersioningError, match="does not exist"):
        add_dataset("data/nothing-here", repo_root=consumer)


def test_add_dataset_git_tracked_path_wraps_dvc_error(consumer):
    _make_images(consumer / "data" / "in-git")
    _git(consumer, "add", "data/in-git")
    with pytest.raises(DataVersioningError, match="dvc add data/in-git") as caught:
        add_dataset("data/in-git", repo_root=consumer)
    assert caught.value.__cause__ is not None


def test_add_dataset_push_without_remote(tmp_path):
    root = tmp_path / "no-remote"
    _init_repo(root)
    _make_images(root / "data" / "new")
    with pytest.raises(DataVersioningError, match="no default DVC remote") as caught:
        add_dataset("data/new", repo_root=root, push=True)
    assert "md5" in str(caught.value)
    assert (root / "data" / "new.dvc").exists()  # added before the push failed


def test_import_dataset_source_missing(tmp_path, consumer):
    with pytest.raises(DataVersioningError, match="import source .* does not exist"):
        import_dataset(str(tmp_path / "no-such-repo"), "data/shop", "data/shop", repo_root=consumer)


def test_import_dataset_source_not_git(tmp_path, consumer):
    _make_images(tmp_path / "folder" / "data" / "shop")
    with pytest.raises(DataVersioningError, match="is not a git repo"):
        import_dataset(str(tmp_path / "folder"), "data/shop", "data/shop", repo_root=consumer)
    assert not (consumer / "data").exists()  # nothing created for a refused import


def test_import_dataset_source_git_but_not_dvc(tmp_path, consumer):
    plain = tmp_path / "plain-git"
    plain.mkdir()
    _git(plain, "init", "-q")
    (plain / "README").write_text("no dvc here\n")
    _git(plain, "add", "README")
    _git(plain, "commit", "-q", "-m", "readme")
    with pytest.raises(DataVersioningError, match="not found in import source.*not a DVC repo") as caught:
        import_dataset(str(plain), "data/shop", "data/shop", repo_root=consumer)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert not (consumer / "data").exists()


def test_import_dataset_missing_path_in_source(registry, consumer):
    with pytest.raises(DataVersioningError, match="data/nope not found in import source"):
        import_dataset(str(registry.root), "data/nope", "data/nope", repo_root=consumer)
    assert not (consumer / "data" / "nope.dvc").exists()


def test_import_dataset_unknown_rev(registry, consumer):
    with pytest.raises(DataVersioningError, match="revision 'no-such-tag' not found") as caught:
        import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=consumer, rev="no-such-tag")
    assert type(caught.value.__cause__).__name__ == "RevError"


def test_import_dataset_into_existing_out(registry, consumer):
    _make_images(consumer / "data" / "shop")
    with pytest.raises(DataVersioningError, match="already exists"):
        import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=consumer)


def test_import_dataset_consumer_not_dvc(registry, tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataVersioningError, match="not a DVC repo"):
        import_dataset(str(registry.root), "data/shop", "data/shop", repo_root=tmp_path / "plain")


def test_tracked_version_of_untracked_path(tmp_path):
    _make_images(tmp_path / "data")
    assert tracked_version(tmp_path / "data") is None
    assert tracked_version(tmp_path / "missing") is None
