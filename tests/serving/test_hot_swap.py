"""A new ``@champion`` (or a new index for it) reaches callers without a restart, and a bad one never does.

Real parts throughout: a copy of the champion's MLflow store, new versions registered with the
real registry calls, a real ``bentoml serve`` of the packaged Bento that reads the copy, and
concurrent HTTP callers while it swaps.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from mlflow import MlflowClient
from serving_support import (
    ADMIN_TOKEN,
    CALLER_KEYS,
    copy_registry,
    flip_byte,
    logged_index_file,
    private_home,
    register_new_version,
    running,
)

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CALLER = {"Authorization": f"Bearer {CALLER_KEYS[0]}"}


@pytest.fixture(scope="module")
def second_clip(other_tiny_clip_dir):
    """Another tiny random CLIP: a version whose embeddings differ from the packaged one's."""
    return other_tiny_clip_dir


def _info(server) -> dict:
    return httpx.post(f"{server.url}/info", json={}, headers=CALLER, timeout=30).json()


def _match(server, path) -> httpx.Response:
    return httpx.post(
        f"{server.url}/match", files={"image": (path.name, path.read_bytes(), "image/jpeg")}, headers=CALLER, timeout=30
    )


def _reload(server) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/reload", json={}, headers=ADMIN, timeout=120)


class Load:
    """Callers sending /match continuously from threads until stopped, keeping every answer."""

    def __init__(self, server, catalogue: dict, callers: int = 4) -> None:
        self.server, self.items = server, [(sku, paths[0]) for sku, paths in catalogue.items()]
        self.answers: list[tuple[float, int, dict]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._call, args=(n,)) for n in range(callers)]

    def _call(self, offset: int) -> None:
        turn = offset
        while not self._stop.is_set():
            sku, path = self.items[turn % len(self.items)]
            turn += 1
            try:
                response = _match(self.server, path)
                body = response.json()
            except (httpx.HTTPError, ValueError) as err:  # a failed request is an answer too
                self.answers.append((time.monotonic(), 0, {"error": repr(err), "sku": sku}))
                continue
            self.answers.append((time.monotonic(), response.status_code, {**body, "sku": sku}))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_a_new_champion_is_swapped_in_under_load_with_no_failed_request(
    keyed_server, packaged, registry_copy, second_clip, tmp_path
):
    champion = packaged.champion
    before = _info(keyed_server)
    version, checksum, _ = register_new_version(champion, registry_copy, second_clip, tmp_path / "v-new")
    with Load(keyed_server, champion.catalogue) as load:
        time.sleep(1.0)
        response = _reload(keyed_server)
        swapped_at = time.monotonic()
        time.sleep(1.5)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["outcome"], result["model_version"], result["index_checksum"]) == ("swapped", version, checksum)
    assert result["previous_version"] == before["model_version"]

    assert len(load.answers) > 20
    failed = [answer for answer in load.answers if answer[1] != 200]
    assert not failed, failed[:5]
    # Each answer names the pair that made it, and only the old and the new pair ever answer.
    pairs = {(body["model_version"], body["index_checksum"]) for _, _, body in load.answers}
    assert pairs == {(before["model_version"], before["index_checksum"]), (version, checksum)}
    # Once the swap has returned (and answers in flight then have landed), only the new pair answers.
    late = [body for at, _, body in load.answers if at > swapped_at + 0.5]
    assert late and {body["model_version"] for body in late} == {version}
    # The new model with its own index still finds every catalogue image's SKU first.
    assert all(body["matches"][0]["sku_id"] == body["sku"] for _, _, body in load.answers)

    info = _info(keyed_server)
    assert (info["model_version"], info["index_checksum"]) == (version, checksum)
    assert info["last_reload"]["outcome"] == "swapped"
    # Asking again changes nothing.
    assert _reload(keyed_server).json()["outcome"] == "unchanged"


def test_a_corrupted_new_index_is_refused_and_the_old_pair_keeps_serving(
    keyed_server, packaged, registry_copy, second_clip, tmp_path
):
    champion = packaged.champion
    before = _info(keyed_server)
    version, _, _ = register_new_version(champion, registry_copy, second_clip, tmp_path / "v-bad", promote=False)
    flip_byte(logged_index_file(registry_copy, version))
    MlflowClient(registry_copy, registry_copy).set_registered_model_alias("skumatch-serving-test", "champion", version)
    try:
        response = _reload(keyed_server)
        assert response.status_code == 409, response.text
        refusal = response.json()
        assert refusal["reason"] == "reload_failed" and refusal["outcome"] == "failed"
        assert "IndexMismatchError" in refusal["error"] and "corrupt" in refusal["error"]
        assert f"still serving version {before['model_version']}" in refusal["error"]

        info = _info(keyed_server)
        assert (info["model_version"], info["index_checksum"]) == (before["model_version"], before["index_checksum"])
        assert info["last_reload"]["outcome"] == "failed" and "corrupt" in info["last_reload"]["error"]
        sku, paths = next(iter(champion.catalogue.items()))
        answer = _match(keyed_server, paths[0])
        assert answer.status_code == 200
        assert answer.json()["model_version"] == before["model_version"]
        assert answer.json()["matches"][0]["sku_id"] == sku
        assert "hot swap to version" in keyed_server.output() and "refused" in keyed_server.output()
    finally:
        MlflowClient(registry_copy, registry_copy).set_registered_model_alias(
            "skumatch-serving-test", "champion", before["model_version"]
        )


def test_index_remove_and_add_reach_the_running_service_through_the_reload_route(
    keyed_server, packaged, registry_copy, prefect_api, tmp_path
):
    """Products removed, then added back, by the real ``remove_products`` / ``add_products`` flows:
    same model version, a new index version each time, picked up without a restart."""
    import pandas as pd

    from flows.index_flows import add_products, remove_products

    champion = packaged.champion
    before = _info(keyed_server)
    version = before["model_version"]
    sku = sorted(champion.catalogue)[-1]
    overrides = [f"registry.tracking_uri={registry_copy}", "index.use_gpu=never"]

    removed = remove_products([sku], model=version, params_path=str(champion.params_file), overrides=overrides)
    response = _reload(keyed_server)
    assert response.status_code == 200, response.text
    assert (response.json()["outcome"], response.json()["model_version"]) == ("swapped", version)
    info = _info(keyed_server)
    assert info["index_checksum"] == removed["checksum"] != before["index_checksum"]
    assert info["catalogue_skus"] == before["catalogue_skus"] - 1
    answer = _match(keyed_server, champion.catalogue[sku][0]).json()
    assert sku not in [hit["sku_id"] for hit in answer["matches"]] and answer["index_checksum"] == removed["checksum"]

    manifest = tmp_path / "manifest.csv"
    rows = [
        {"image_path": str(path), "sku_id": sku, "split": "catalogue", "role": "catalogue"}
        for path in champion.catalogue[sku]
    ]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    added = add_products(str(manifest), model=version, params_path=str(champion.params_file), overrides=overrides)
    assert added["parent_index_version"] == removed["index_version"]
    assert _reload(keyed_server).json()["outcome"] == "swapped"
    answer = _match(keyed_server, champion.catalogue[sku][0]).json()
    assert answer["matches"][0]["sku_id"] == sku and answer["index_checksum"] == added["checksum"]
    assert _info(keyed_server)["catalogue_skus"] == before["catalogue_skus"]


def test_the_poll_interval_brings_a_promoted_version_in_without_asking(packaged, second_clip, tmp_path):
    registry_uri = copy_registry(packaged.champion, tmp_path / "registry")
    env = {
        **private_home(packaged.champion.env, tmp_path),
        "MLFLOW_TRACKING_URI": registry_uri,
        "SKUMATCH_RELOAD_POLL_SECONDS": "1",
    }
    with running(packaged.bento_tag, env, tmp_path / "serve.log") as server:
        assert _info(server)["reload_poll_seconds"] == 1.0
        version, checksum, _ = register_new_version(packaged.champion, registry_uri, second_clip, tmp_path / "v")
        deadline = time.monotonic() + 60
        while _info(server)["model_version"] != version and time.monotonic() < deadline:
            time.sleep(0.5)
        info = _info(server)
        assert (info["model_version"], info["index_checksum"]) == (version, checksum), server.output()[-3000:]
        # No admin token is configured: the admin route stays closed while polling works.
        assert httpx.post(f"{server.url}/admin/reload", json={}, timeout=30).status_code == 403


def test_admin_route_needs_the_admin_token(keyed_server):
    assert httpx.post(f"{keyed_server.url}/admin/reload", json={}, timeout=30).status_code == 401
    nope = {"Authorization": "Bearer nope"}
    wrong = httpx.post(f"{keyed_server.url}/admin/reload", json={}, headers=nope, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["reason"] == "unauthorized"
    assert wrong.headers["www-authenticate"].startswith("Bearer")
