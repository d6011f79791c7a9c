"""The matching service: a BentoML 1.4 service over the packaged ``@champion`` encoder and index.

The model it starts with lives in the BentoML model store (``serving.build.package_model`` puts it
there): a folder with ``encoder/``, ``index/`` and ``thumbnails/`` and, in its metadata, the
registry facts (``model_name``, ``model_version``, ``index_checksum``) the index is verified
against, the ``serve`` params it was packaged with, and the registry's tracking URI. A corrupt
or mismatched index raises ``IndexMismatchError`` in ``__init__``, so the service never becomes
ready rather than answering from the wrong index. A newer ``@champion`` is swapped in while
serving (``serving.swap``).

Which stored model: the bento argument ``bento_model`` (recorded in the Bento by
``serving.build.build_bento``; when serving from source, ``bentoml serve serving.service:Matcher
--arg bento_model=NAME``), else the environment variable ``SKUMATCH_BENTO_MODEL``, else
``skumatch-matcher``; a name without a version means ``:latest``.

Routes (``serving/README.md`` has the request and answer of each):

- ``POST /match``, ``/match_batch``, ``/embed``: multipart image uploads only;
- ``POST /info``, ``/thumbnail``: what is served, a catalogue thumbnail for the explorer page;
- ``POST /admin/reload``: check ``@champion`` now and swap to it (admin token);
- ``GET /``: the match explorer page; ``GET /docs``: BentoML's Swagger UI; ``GET /livez``,
  ``/readyz``, ``/healthz``, ``/metrics``: BentoML's own, ``/metrics`` with the skumatch series.

Layers, outermost first: request id, latency and refusal metrics (``serving.observability``);
the pages; credentials (``serving.access``); the upload guard (``serving.uploads``); BentoML's
validation; the handlers below, which decode on a small thread pool and leave the model work to
the inference thread (``serving.inference``), so the event loop stays free for probes.
"""

import asyncio
import gc
import json
import logging
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Optional

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel, Field

from components.config import BatchingParams, ServeParams, UploadLimits
from serving import SERVICE_NAME
from serving.access import AccessGuard
from serving.explorer import Pages
from serving.inference import InferenceQueue, TorchLanes, in_short_lived_thread, lane_count, threads_per_worker
from serving.observability import METRICS, RequestContext, RequestIdFilter
from serving.refusals import refusal_response
from serving.swap import ModelSlot, registry_loader
from serving.uploads import BadImage, UploadGuard, decode_image

LOGGER = logging.getLogger(__name__)

MODEL_ENV = "SKUMATCH_BENTO_MODEL"
MODEL_ARG = "bento_model"
POLL_ENV = "SKUMATCH_RELOAD_POLL_SECONDS"
DEFAULT_BENTO_MODEL = ServeParams.model_fields["bento_model_name"].default
MAX_TOP_K = 100
# Metadata keys the packaged model must carry (written by serving.build.package_model).
REQUIRED_METADATA = ("model_name", "model_version", "index_checksum")
THUMBNAILS = "thumbnails"
ROUTES = frozenset({"/match", "/match_batch", "/embed", "/info", "/thumbnail", "/admin/reload", "/", "/docs"})
# Image routes: the form field that carries files and how many it takes (None: the limit).
FILE_FIELDS = {"/match": ("image", 1), "/embed": ("image", 1), "/match_batch": ("images", None)}


def bento_model_tag() -> str:
    """The stored model to serve: bento argument, then environment, then the default name."""
    args = bentoml.use_arguments()
    name = getattr(args, MODEL_ARG, None) or os.environ.get(MODEL_ENV) or DEFAULT_BENTO_MODEL
    return name if ":" in name else f"{name}:latest"


def configured_workers(service_name: str) -> int:
    """How many worker processes BentoML runs this service with, after every config override.

    ``@bentoml.service(workers=...)`` can be overridden at deploy time (a BentoML config file or
    ``BENTOML_CONFIG_OVERRIDES``); BentoML merges the result into its config container before a
    worker builds the service, and that merged value is the one that runs. ``"cpu_count"`` means
    one worker per CPU. (BentoML 1.4 has no public call for it.)
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    workers = (BentoMLContainer.config.services.get().get(service_name) or {}).get("workers") or 1
    return len(os.sched_getaffinity(0)) if workers == "cpu_count" else int(workers)


def worker_torch_threads(default_threads: int, workers: int, environ: Mapping[str, str]) -> int:
    """The torch threads a worker sets: its share of torch's default, unless ``OMP_NUM_THREADS``
    is set explicitly, which wins (torch has already applied it)."""
    return default_threads if "OMP_NUM_THREADS" in environ else threads_per_worker(default_threads, workers)


def packaged_serve_params(facts: dict[str, Any]) -> ServeParams:
    """The ``serve`` params a model was packaged with (older packages: their top_k and batch size)."""
    if facts.get("serve_params"):
        return ServeParams.model_validate(json.loads(facts["serve_params"]))
    defaults = ServeParams()
    return ServeParams(
        top_k=int(facts.get("default_top_k") or defaults.top_k),
        batch_size=int(facts.get("batch_size") or defaults.batch_size),
    )


class Match(BaseModel):
    sku_id: str
    score: float
    # False below the open-set threshold calibrated for this model (no confident match).
    confident: bool = True


class MatchResponse(BaseModel):
    model_name: str
    model_version: str
    index_checksum: str
    matches: list[Match]
    # True when even the best SKU is below the threshold: likely a product not in the catalogue.
    no_confident_match: bool = False
    reject_below: Optional[float] = None


class ImageMatches(BaseModel):
    matches: list[Match]
    no_confident_match: bool = False


class BatchMatchResponse(BaseModel):
    model_name: str
    model_version: str
    index_checksum: str
    # One per uploaded image, in upload order.
    results: list[ImageMatches]
    reject_below: Optional[float] = None


class EmbedResponse(BaseModel):
    model_name: str
    model_version: str
    index_checksum: str
    embedding: list[float]


class ReloadResponse(BaseModel):
    outcome: str  # "swapped", "unchanged" or "failed"
    model_version: str
    index_checksum: str
    at: str
    error: Optional[str] = None
    previous_version: Optional[str] = None


class InfoResponse(BaseModel):
    model_name: str
    model_version: str
    index_checksum: str
    catalogue_size: int
    catalogue_skus: int
    embed_dim: int
    default_top_k: int
    # Photos embedded per forward pass (serve.batch_size when packaged).
    batch_size: int
    bento_model: str
    # How this process runs the model: BentoML worker processes, torch threads, device.
    workers: int
    torch_threads: int
    # Threads embedding side by side in each worker, sharing its torch threads (serve.lanes).
    lanes: int
    device: str
    # What runs the model for queries: the runtime the index's vectors were embedded on (embedding.runtime).
    embedding_runtime: str
    limits: UploadLimits
    batching: BatchingParams
    # Whether caller routes need an API key, and whether admin routes are on.
    api_keys_required: bool
    admin_enabled: bool
    reload_poll_seconds: float
    # The last check of @champion (None before the first): outcome, versions, error.
    last_reload: Optional[ReloadResponse] = None
    thumbnails: int


ImageUpload = Annotated[Path, Field(description="the query image file (JPEG, PNG or WebP by default)")]
ImageUploads = Annotated[
    list[Path],
    Field(
        min_length=1,
        description="query image files, the form field repeated once per image (serve.limits.max_images_per_request)",
    ),
]
TopK = Annotated[
    Optional[Annotated[int, Field(ge=1, le=MAX_TOP_K)]],
    Field(description=f"how many SKUs to return, 1..{MAX_TOP_K}; default: the packaged serve.top_k"),
]


# The stored model this process serves first (the class attribute makes BentoML pack it).
PACKAGED_MODEL = bentoml.models.BentoModel(bento_model_tag())


@bentoml.service(
    name=SERVICE_NAME,
    resources={"cpu": "2"},
    # 127.0.0.1 unless the operator says otherwise (`bentoml serve --host`; `serve.host` through
    # `skumatch serve`): keys are optional.
    http={"host": "127.0.0.1"},
    # One image per request on a CPU is milliseconds to ~100 ms (CLIP B/32); 30 s leaves room
    # for a queue of concurrent requests and large uploads.
    traffic={"timeout": 30},
)
class Matcher:
    """Match a product photo to catalogue SKUs with the packaged encoder and FAISS index."""

    bento_model = PACKAGED_MODEL

    def __init__(self) -> None:
        # Heavy imports here, not at module level: `bentoml build` imports this module only
        # to read the service definition.
        import torch

        from components.matcher import load_served_model

        # BentoML's server logging shows warnings only, outside its own loggers: the service's
        # start-up, swap and per-request lines are INFO, each prefixed with its request id.
        logging.getLogger("serving").setLevel(logging.INFO)
        for name in ("serving.service", "serving.swap", "serving.observability"):
            logging.getLogger(name).addFilter(RequestIdFilter())
        # BentoML does not share the CPUs out among workers, and torch gives every process a
        # thread per core: 2 workers on 2 cores served 0.37 times one worker's requests per
        # second (benchmarks/results/serving.md). So each worker takes its share of torch's
        # default; an explicit OMP_NUM_THREADS wins.
        self.workers = configured_workers(SERVICE_NAME)
        torch.set_num_threads(worker_torch_threads(torch.get_num_threads(), self.workers, os.environ))
        self.torch_threads = torch.get_num_threads()

        facts = packaged_facts()
        missing = [key for key in REQUIRED_METADATA if not facts.get(key)]
        if missing:
            raise RuntimeError(
                f"bento model {self.bento_model.tag} lacks metadata {missing}; package it with "
                "serving.build.package_model"
            )
        self.serve = packaged_serve_params(facts)
        self.model_name = str(facts["model_name"])
        folder = Path(self.bento_model.path)
        # An index embedded on ONNX Runtime: each lane's call runs on that lane's share of the threads.
        onnx_threads = threads_per_worker(self.torch_threads, lane_count(self.serve.lanes, self.torch_threads, "cpu"))
        # IndexMismatchError propagates on purpose: a service must not start on a wrong index.
        # Not on this (long-lived) thread: see serving.inference.in_short_lived_thread.
        served = in_short_lived_thread(
            load_served_model,
            folder / "encoder",
            folder / "index",
            self.model_name,
            str(facts["model_version"]),
            str(facts["index_checksum"]),
            self.serve.batch_size,
            self.serve.device,
            onnx_threads,
        )
        self.device = str(next(served.encoder.parameters()).device)
        self.thumbnail_dir = folder / THUMBNAILS
        index_file = self.thumbnail_dir / "index.json"
        self.thumbnails: dict[str, str] = json.loads(index_file.read_text()) if index_file.exists() else {}
        self.bento_model_tag = str(self.bento_model.tag)
        METRICS.set_model(served.version, served.index_checksum)

        self.lanes = lane_count(self.serve.lanes, self.torch_threads, self.device)
        self.inference = InferenceQueue(
            self.serve.batching,
            TorchLanes(self.lanes, threads_per_worker(self.torch_threads, self.lanes)),
            on_batch=lambda model, images: METRICS.batch(images, model.version, model.index_checksum),
        )
        # Decoding runs beside the model (Pillow releases the GIL), never on the event loop.
        self.decoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="skumatch-decode")
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or str(facts.get("tracking_uri") or "")
        self.registry_configured = bool(tracking_uri)
        target, load = (
            registry_loader(tracking_uri, self.model_name, self.serve.batch_size, self.serve.device, onnx_threads)
            if tracking_uri
            else (_no_registry, None)
        )
        self.slot = ModelSlot(
            served, target, load, on_swap=lambda model: METRICS.set_model(model.version, model.index_checksum)
        )
        self.poll_seconds = float(os.environ.get(POLL_ENV) or self.serve.reload_poll_seconds)
        if self.poll_seconds > 0 and tracking_uri:
            self.slot.poll(self.poll_seconds, on_result=lambda result: METRICS.reload(result.outcome))
        from serving.access import Credentials

        credentials = Credentials.from_environment()
        self.api_keys_required, self.admin_enabled = credentials.callers_need_key, credentials.admin_digest is not None
        # Start-up leaves millions of long-lived objects (torch, MLflow, BentoML): kept out of the
        # collector's full passes, which otherwise pause a request now and then.
        gc.collect()
        gc.freeze()
        # The event loop waits for the GIL behind the inference and decoding threads; a shorter
        # switch interval than Python's 5 ms lets it answer probes between their steps.
        sys.setswitchinterval(0.001)
        LOGGER.info(
            "serving %s version %s from %s (index %s, %d catalogue images) on %s; %d workers, %d torch "
            "threads each on %d lanes; API keys %s; @champion checked %s",
            self.model_name,
            served.version,
            self.bento_model_tag,
            served.index_checksum,
            len(served.catalogue),
            self.device,
            self.workers,
            self.torch_threads,
            self.lanes,
            "required" if self.api_keys_required else "off",
            f"every {self.poll_seconds:g} s" if self.poll_seconds > 0 and tracking_uri else "on request",
        )

    @bentoml.on_shutdown
    def _shut_down(self) -> None:
        self.slot.close()
        self.inference.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)

    async def _decode(self, uploads: list[Path]) -> tuple[list, list[dict[str, Any]], BadImage | None]:
        """Decoded images, and each refused upload by position with its reason (the first refusal too)."""
        loop = asyncio.get_running_loop()
        pictures, bad, first = [], [], None
        for position, upload in enumerate(uploads):
            try:
                pictures.append(await loop.run_in_executor(self.decoders, decode_image, upload, self.serve.limits))
            except BadImage as err:
                # The position, not the file name: BentoML stores uploads under temporary names.
                bad.append({"index": position, "error": str(err), "reason": err.reason})
                first = first or err
        return pictures, bad, first

    async def _matches(self, served, pictures: list, top_k: Optional[int]) -> list[ImageMatches]:
        results = await self.inference.match(served, pictures, top_k or self.serve.top_k)
        found = [
            ImageMatches(
                matches=[Match(**hit) for hit in hits], no_confident_match=bool(hits) and not hits[0]["confident"]
            )
            for hits in results
        ]
        METRICS.answers(
            [hits[0]["score"] for hits in results if hits],
            [bool(hits[0]["confident"]) for hits in results if hits],
            served.version,
            served.index_checksum,
        )
        return found

    @bentoml.api(route="/match")
    async def match(self, image: ImageUpload, top_k: TopK = None) -> MatchResponse:
        """The ``top_k`` best-matching catalogue SKUs for an image, best first, with cosine scores."""
        served = self.slot.current  # the pair this request is answered by, whatever swaps meanwhile
        pictures, _, refused = await self._decode([image])
        if refused:
            return refusal_response(refused.status, refused.reason, str(refused))
        found = (await self._matches(served, pictures, top_k))[0]
        return MatchResponse(
            model_name=served.model_name,
            model_version=served.version,
            index_checksum=served.index_checksum,
            matches=found.matches,
            no_confident_match=found.no_confident_match,
            reject_below=served.reject_below,
        )

    @bentoml.api(route="/match_batch")
    async def match_batch(self, images: ImageUploads, top_k: TopK = None) -> BatchMatchResponse:
        """``/match`` for several images in one request, results in upload order.

        One refused image refuses the request; ``bad_images`` names each by position, so the
        client can resend the others.
        """
        served = self.slot.current
        pictures, bad, refused = await self._decode(images)
        if refused:
            status = 413 if all(item["reason"].startswith("max_") for item in bad) else 400
            return refusal_response(
                status,
                refused.reason,
                f"{len(bad)} of {len(images)} images could not be decoded; nothing was matched, resend without them",
                bad_images=bad,
            )
        return BatchMatchResponse(
            model_name=served.model_name,
            model_version=served.version,
            index_checksum=served.index_checksum,
            results=await self._matches(served, pictures, top_k),
            reject_below=served.reject_below,
        )

    @bentoml.api(route="/embed")
    async def embed(self, image: ImageUpload) -> EmbedResponse:
        """The unit-norm embedding of an image as a query: the vector ``/match`` searches the index with."""
        served = self.slot.current
        pictures, _, refused = await self._decode([image])
        if refused:
            return refusal_response(refused.status, refused.reason, str(refused))
        vector = (await self.inference.embed(served, pictures))[0]
        return EmbedResponse(
            model_name=served.model_name,
            model_version=served.version,
            index_checksum=served.index_checksum,
            embedding=[float(x) for x in vector],
        )

    @bentoml.api(route="/thumbnail")
    def thumbnail(self, sku_id: Annotated[str, Field(max_length=512)]) -> Annotated[Path, ContentType("image/jpeg")]:
        """The catalogue thumbnail of a SKU (JPEG), as packed with the model; 404 when there is none."""
        from starlette.responses import Response

        # A lookup in the packaged map: the file name is the packager's, never the caller's.
        name = self.thumbnails.get(sku_id)
        if name is None:
            return refusal_response(404, "no_thumbnail", f"no thumbnail for SKU {sku_id[:100]!r}")
        return Response(
            (self.thumbnail_dir / name).read_bytes(), media_type="image/jpeg", headers={"cache-control": "max-age=3600"}
        )

    @bentoml.api(route="/admin/reload")
    async def reload(self) -> ReloadResponse:
        """Check ``@champion`` now and swap to it if it changed (admin token). 409 when it cannot be loaded."""
        if not self.registry_configured:
            return refusal_response(409, "no_registry", "this service knows no registry: set MLFLOW_TRACKING_URI")
        result = await asyncio.to_thread(self.slot.check)
        METRICS.reload(result.outcome)
        if result.outcome == "failed":
            detail = {key: value for key, value in result.as_dict().items() if key != "error"}
            return refusal_response(
                409,
                "reload_failed",
                f"@champion was not swapped in, still serving version {result.model_version}: {result.error}",
                **detail,
            )
        return ReloadResponse(**result.as_dict())

    @bentoml.api(route="/info")
    def info(self) -> InfoResponse:
        """What is being served: model, version, index checksum, catalogue size and how it runs."""
        served = self.slot.current
        catalogue = served.catalogue
        last = self.slot.last_check
        return InfoResponse(
            model_name=served.model_name,
            model_version=served.version,
            index_checksum=served.index_checksum,
            catalogue_size=len(catalogue),
            catalogue_skus=catalogue.items.sku_count,
            embed_dim=catalogue.dim,
            default_top_k=self.serve.top_k,
            batch_size=served.batch_size,
            bento_model=self.bento_model_tag,
            workers=self.workers,
            torch_threads=self.torch_threads,
            lanes=self.lanes,
            device=self.device,
            embedding_runtime=served.embedder.runtime,
            limits=self.serve.limits,
            batching=self.serve.batching,
            api_keys_required=self.api_keys_required,
            admin_enabled=self.admin_enabled,
            reload_poll_seconds=self.poll_seconds,
            last_reload=ReloadResponse(**last.as_dict()) if last else None,
            thumbnails=len(self.thumbnails),
        )


def _no_registry() -> tuple[str, Optional[str]]:
    raise RuntimeError("no registry configured (MLFLOW_TRACKING_URI)")


@lru_cache(maxsize=1)
def packaged_facts() -> dict[str, Any]:
    """The packaged model's labels and metadata (read once per process)."""
    stored = PACKAGED_MODEL.resolve()
    return {**stored.info.labels, **stored.info.metadata}


def packaged_limits() -> UploadLimits:
    """The upload limits the model was packaged with (what the upload guard enforces)."""
    return packaged_serve_params(packaged_facts()).limits


# Outermost first: ids and metrics see every answer, pages need no key, credentials come before
# any body is read.
Matcher.add_asgi_middleware(RequestContext, routes=ROUTES)
Matcher.add_asgi_middleware(Pages)
Matcher.add_asgi_middleware(AccessGuard)
Matcher.add_asgi_middleware(UploadGuard, file_fields=FILE_FIELDS, limits=packaged_limits)
