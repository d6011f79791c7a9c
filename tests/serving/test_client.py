"""``serving.client.SkumatchClient`` and ``skumatch match`` against a real ``bentoml serve``, and the
service's OpenAPI document.

Nothing is mocked: the module's ``server`` fixture is the packaged tiny ``@champion`` served over
HTTP, and the credentials test starts a second server with API keys and an admin token.
"""

from __future__ import annotations

import io
import math
import re
import time

import httpx
import jsonschema
import pytest
from PIL import Image
from serving_support import ADMIN_TOKEN, CALLER_KEYS
from typer.testing import CliRunner

from flows.cli import app
from serving.client import ImageResult, MatchResult, RefusedImage, SkumatchClient, SkumatchError
from serving.local import free_port

pytestmark = pytest.mark.integration

TRUNCATED = "the uploaded image is truncated or corrupt"


def _jpeg(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    return _jpeg()[:300]


def _requests_to(server, route: str) -> int:
    """Requests to ``route`` so far, from BentoML's access log (``... path=/match_batch,type=...``)."""
    return server.output().count(f"path={route},")


def _wait_for_requests(server, route: str, expected: int, timeout: float = 10.0) -> int:
    # The access-log line is written as the response goes out, so it can land a moment after
    # the client has its answer.
    deadline = time.monotonic() + timeout
    while _requests_to(server, route) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return _requests_to(server, route)


def test_client_match_by_path_str_and_bytes_finds_the_catalogue_sku_first(server, packaged):
    champion = packaged.champion
    sku, paths = next(iter(champion.catalogue.items()))
    with SkumatchClient(server.url) as client:
        answers = [client.match(paths[0]), client.match(str(paths[0])), client.match(paths[0].read_bytes())]
        assert client.info()["model_version"] == champion.version
    for answer in answers:
        assert isinstance(answer, MatchResult)
        assert (answer.model_name, answer.model_version, answer.index_checksum) == (
            "skumatch-serving-test",
            champion.version,
            champion.index_checksum,
        )
        assert len(answer.matches) == 3  # the packaged serve.top_k
        assert answer.matches[0].sku_id == sku
        assert answer.matches[0].score == pytest.approx(1.0, abs=1e-4)
        assert answer.matches[0].confident is (not answer.no_confident_match)
    # Path, str and bytes send the same file: the same answer.
    assert answers[0] == answers[1]
    assert [hit.sku_id for hit in answers[2].matches] == [hit.sku_id for hit in answers[0].matches]


def test_client_match_top_k_and_embed(server, packaged):
    champion = packaged.champion
    path = next(iter(champion.catalogue.values()))[0]
    with SkumatchClient(server.url) as client:
        assert len(client.match(path, top_k=1).matches) == 1
        assert len(client.match(path, top_k=100).matches) == len(champion.catalogue)  # every SKU once
        vector = client.embed(path)
    assert len(vector) == 16
    assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-5)


def test_client_match_batch_splits_into_requests_and_keeps_input_order(server, packaged):
    champion = packaged.champion
    # Every catalogue image (several per SKU), reversed, so an answer in any order but the
    # caller's would fail; bytes and paths mixed.
    items = [(sku, path) for sku, paths in champion.catalogue.items() for path in paths][::-1]
    images = [path.read_bytes() if position % 3 == 0 else path for position, (_, path) in enumerate(items)]
    before = {route: _requests_to(server, route) for route in ("/match_batch", "/info")}
    with SkumatchClient(server.url, max_images_per_request=2) as client:
        results = client.match_batch(images, top_k=2)
        again = client.match_batch(images[:3])
    expected_requests = math.ceil(len(images) / 2) + math.ceil(3 / 2)

    assert len(results) == len(images) == 18
    assert all(isinstance(result, ImageResult) for result in results)
    assert [result.matches[0].sku_id for result in results] == [sku for sku, _ in items]
    assert all(result.matches[0].score == pytest.approx(1.0, abs=1e-4) for result in results)
    assert all(len(result.matches) == 2 for result in results)
    assert {(result.model_version, result.index_checksum) for result in results} == {
        (champion.version, champion.index_checksum)
    }
    assert [result.matches[0].sku_id for result in again] == [sku for sku, _ in items[:3]]
    # 2 images a request: 9 requests for the 18, 2 for the 3; the server's limit read only once.
    assert (
        _wait_for_requests(server, "/match_batch", before["/match_batch"] + expected_requests) - before["/match_batch"]
        == expected_requests
    )
    assert _requests_to(server, "/info") - before["/info"] == 1


def test_client_match_batch_of_nothing_sends_nothing(server):
    with SkumatchClient(server.url) as client:
        assert client.match_batch([]) == []


def test_client_raises_skumatch_error_for_a_bad_image(server):
    with SkumatchClient(server.url) as client, pytest.raises(SkumatchError) as refused:
        client.match(_truncated_jpeg())
    err = refused.value
    assert isinstance(err, RuntimeError)
    assert (err.status, err.reason, err.bad_images) == (400, "corrupt", ())
    assert TRUNCATED in err.message
    assert str(err).startswith("HTTP 400 (corrupt): ") and TRUNCATED in str(err)


def test_client_match_batch_error_names_bad_images_in_the_callers_numbering(server, packaged):
    good = [paths[0] for paths in packaged.champion.catalogue.values()]
    # Positions 4 and 5 are bad; at 2 images a request they are the third request's 0 and 1.
    images = [*good[:4], b"not an image\n", _truncated_jpeg(), good[4]]
    before = _requests_to(server, "/match_batch")
    with SkumatchClient(server.url, max_images_per_request=2) as client, pytest.raises(SkumatchError) as refused:
        client.match_batch(images)
    err = refused.value
    assert err.status == 400 and err.reason == "format"  # the request's first refusal
    assert "2 of 2 images could not be decoded" in err.message
    assert [(bad.index, bad.reason) for bad in err.bad_images] == [(4, "format"), (5, "corrupt")]
    assert isinstance(err.bad_images[0], RefusedImage) and "not an image" in err.bad_images[0].error
    assert TRUNCATED in err.bad_images[1].error
    assert "  image 4: " in str(err) and "  image 5: " in str(err)
    # The first two requests were answered; the refused third stopped it, so the last image was not sent.
    assert _wait_for_requests(server, "/match_batch", before + 3) - before == 3

    with SkumatchClient(server.url, max_images_per_request=2) as client:
        answered = client.iter_match_batch(images)
        assert [next(answered).matches[0].sku_id for _ in range(4)] == list(packaged.champion.catalogue)[:4]
        with pytest.raises(SkumatchError):
            next(answered)


def _resolve(document: dict, ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [*([node["$ref"]] if "$ref" in node else []), *(ref for value in node.values() for ref in _refs(value))]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_openapi_document_lists_every_route_and_the_upload_forms(server):
    response = httpx.get(f"{server.url}/docs.json", timeout=30)
    assert response.status_code == 200, response.text
    document = response.json()
    # OpenAPI 3 (BentoML 1.4 writes 3.0.2), with the fields the specification requires.
    assert re.fullmatch(r"3\.\d+\.\d+", document["openapi"]), document["openapi"]
    assert document["info"]["title"] == "skumatch" and isinstance(document["info"]["version"], str)
    for route in ("/match", "/match_batch", "/embed", "/info", "/thumbnail", "/admin/reload"):
        assert "post" in document["paths"].get(route, {}), route
    operations = [
        op
        for item in document["paths"].values()
        for method, op in item.items()
        if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace")
    ]
    assert all(
        op["responses"] and all(re.fullmatch(r"[1-5]\d\d|default", code) for code in op["responses"])
        for op in operations
    )
    operation_ids = [op["operationId"] for op in operations if "operationId" in op]
    assert len(operation_ids) == len(set(operation_ids))
    # Every reference resolves, and every schema an operation uses, directly or through
    # references, is a well-formed JSON schema (OpenAPI 3.0's schema objects extend JSON Schema
    # draft 4). Only those: BentoML also writes an unreferenced "<api>__Input" component per API
    # whose file fields say Swagger 2's "type": "file", which no client reads.
    for ref in _refs(document):
        _resolve(document, ref)
    used = [
        media["schema"]
        for op in operations
        for part in [op.get("requestBody", {}), *op["responses"].values()]
        for media in part.get("content", {}).values()
        if "schema" in media
    ]
    seen: set[str] = set()
    while used:
        schema = used.pop()
        jsonschema.Draft4Validator.check_schema(schema)
        for ref in set(_refs(schema)) - seen:
            seen.add(ref)
            used.append(_resolve(document, ref))
    assert "#/components/schemas/Match" in seen

    def upload_form(route: str) -> dict:
        body = document["paths"][route]["post"]["requestBody"]["content"]
        assert list(body) == ["multipart/form-data"], (route, list(body))
        return body["multipart/form-data"]["schema"]

    match_form = upload_form("/match")
    jsonschema.Draft4Validator.check_schema(match_form)
    assert match_form["required"] == ["image"]
    assert match_form["properties"]["image"]["type"] == "string"
    assert match_form["properties"]["image"]["format"] == "binary"
    assert match_form["properties"]["top_k"]["type"] == "integer"
    assert (match_form["properties"]["top_k"]["minimum"], match_form["properties"]["top_k"]["maximum"]) == (1, 100)
    assert upload_form("/embed")["properties"]["image"]["format"] == "binary"
    batch_images = upload_form("/match_batch")["properties"]["images"]
    assert batch_images["type"] == "array" and batch_images["items"] == {"type": "string", "format": "binary"}
    # What /match answers is documented too, down to the Match schema.
    answer = document["paths"]["/match"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"model_name", "model_version", "index_checksum", "matches"} <= set(answer["required"])
    assert set(_resolve(document, answer["properties"]["matches"]["items"]["$ref"])["properties"]) == {
        "sku_id",
        "score",
        "confident",
    }


def test_api_keys_401_without_a_key_and_403_for_a_caller_key_on_admin_routes(keyed_server, packaged):
    sku, paths = next(iter(packaged.champion.catalogue.items()))
    first_key, second_key = CALLER_KEYS
    with SkumatchClient(keyed_server.url, second_key) as client:
        assert client.match(paths[0]).matches[0].sku_id == sku
        assert client.info()["api_keys_required"] is True
        served = client.info()["model_version"]  # the hot-swap tests move @champion on this server
    with SkumatchClient(keyed_server.url) as client, pytest.raises(SkumatchError) as unauthorized:
        client.match(paths[0])
    assert (unauthorized.value.status, unauthorized.value.reason) == (401, "unauthorized")
    assert "missing or wrong API key" in str(unauthorized.value)
    with SkumatchClient(keyed_server.url, first_key) as client, pytest.raises(SkumatchError) as forbidden:
        client.reload()
    assert (forbidden.value.status, forbidden.value.reason) == (403, "forbidden")
    with SkumatchClient(keyed_server.url, ADMIN_TOKEN) as admin:
        # The server reads a registry copy whose @champion is the version it serves.
        reloaded = admin.reload()
        assert (reloaded["outcome"], reloaded["model_version"]) == ("unchanged", served)
        assert admin.match(paths[0]).matches[0].sku_id == sku  # the admin token opens caller routes too

    runner = CliRunner()
    by_option = runner.invoke(
        app, ["match", str(paths[0]), "--url", keyed_server.url, "--api-key", first_key], env={"SKUMATCH_API_KEY": None}
    )
    assert by_option.exit_code == 0, by_option.output
    assert by_option.output.splitlines()[0] == f"{paths[0]} -> model skumatch-serving-test v{served}"
    assert by_option.output.splitlines()[1].split()[1] == sku
    by_env = runner.invoke(
        app, ["match", str(paths[0]), str(paths[1]), "--url", keyed_server.url], env={"SKUMATCH_API_KEY": second_key}
    )
    assert by_env.exit_code == 0, by_env.output
    assert by_env.output.count(" -> model skumatch-serving-test") == 2
    keyless = runner.invoke(app, ["match", str(paths[0]), "--url", keyed_server.url], env={"SKUMATCH_API_KEY": None})
    assert keyless.exit_code == 1
    assert "HTTP 401 (unauthorized): missing or wrong API key" in keyless.output


def test_cli_match_reports_a_bad_single_photo_by_its_path(server, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(_truncated_jpeg())
    refused = CliRunner().invoke(app, ["match", str(broken), "--url", server.url])
    assert refused.exit_code == 1
    assert f"{broken}: {TRUNCATED}" in refused.output


def test_cli_match_says_when_no_service_answers(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg())
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(app, ["match", str(photo), "--url", url])
    assert result.exit_code == 1
    assert f"no answer from {url}" in result.output
