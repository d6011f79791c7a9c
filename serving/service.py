"""The matching service: a BentoML 1.4 service over the packaged ``@champion`` encoder and index.

The model it serves lives in the BentoML model store (``serving.build.package_model`` puts it
there): a folder with ``encoder/`` and ``index/`` and, in its metadata, the registry facts
(``model_name``, ``model_version``, ``index_checksum``) the index is verified against at
start-up. A corrupt or mismatched index raises ``IndexMismatchError`` in ``__init__``, so the
service never becomes ready rather than answering from the wrong index.

Which stored model: the bento argument ``bento_model`` (recorded in the Bento by
``serving.build.build_bento``; when serving from source, ``bentoml serve serving.service:Matcher
--arg bento_model=NAME``), else the environment variable ``SKUMATCH_BENTO_MODEL``, else
``skumatch-matcher``; a name without a version means ``:latest``.

HTTP API (all ``POST``; BentoML adds ``GET /livez``, ``/readyz``, ``/healthz``, ``/metrics`` and the
Swagger UI at ``/``):

- ``/match``: multipart ``image`` (a file) and optional ``top_k`` (1..100) ->
  ``{"model_name", "model_version", "matches": [{"sku_id", "score"}, ...]}``.
- ``/match_batch``: multipart ``images`` (1..64 files, the field repeated) and optional ``top_k``
  -> ``{"model_name", "model_version", "reject_below", "results": [{"matches", "no_confident_match"},
  ...]}``, one result per image in upload order. For a client holding several photos at once (the
  crops of one shelf photo): one request instead of one each, embedded ``serve.batch_size`` at a time.
- ``/embed``: multipart ``image`` -> ``{"model_name", "model_version", "embedding": [...]}``.
- ``/info``: empty JSON body ``{}`` -> model name, version, index checksum, catalogue size.

An upload that is not a decodable image (empty, random bytes, truncated, text) is answered with
HTTP 400 and ``{"error": "..."}``, as is a text value where the file should be and a malformed
multipart body (``serving.uploads.UploadGuard``; bodies over 32 MiB get 413); a missing field or
an out-of-range ``top_k`` is rejected by BentoML's request validation with HTTP 400 and
``{"error": ..., "detail": [...]}``. In ``/match_batch`` one undecodable image refuses the whole
request (400), and ``bad_images`` names every such upload by its position (from 0) with its
reason, so a client can resend the others.

/match is deliberately not batchable in BentoML's sense (adaptive batching of concurrent
requests): requests carry their own ``top_k``, BentoML batches only single-argument APIs, and
per-request decoding is what turns a bad upload into a 400 for that request alone instead of
failing other clients' requests. Batching is the client's choice instead: ``/match_batch``.
"""

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import bentoml
from pydantic import BaseModel, Field

from components.config import ServeParams
from serving import MAX_BATCH_IMAGES, SERVICE_NAME
from serving.uploads import BadImage, UploadGuard, decode_image

LOGGER = logging.getLogger(__name__)

MODEL_ENV = "SKUMATCH_BENTO_MODEL"
MODEL_ARG = "bento_model"
DEFAULT_BENTO_MODEL = ServeParams.model_fields["bento_model_name"].default
DEFAULT_TOP_K = ServeParams.model_fields["top_k"].default
DEFAULT_BATCH_SIZE = ServeParams.model_fields["batch_size"].default
MAX_TOP_K = 100
# Metadata keys the packaged model must carry (written by serving.build.package_model).
REQUIRED_METADATA = ("model_name", "model_version", "index_checksum")


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
    one worker per CPU.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    workers = (BentoMLContainer.config.services.get().get(service_name) or {}).get("workers") or 1
    return len(os.sched_getaffinity(0)) if workers == "cpu_count" else int(workers)


def threads_per_worker(threads: int, workers: int) -> int:
    """Torch intra-op threads for one worker: a process's ``threads`` shared out among the workers, at least 1."""
    return max(1, threads // workers)


def _bad_request(message: str, **detail: Any):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, **detail}, status_code=400)


class Match(BaseModel):
    sku_id: str
    score: float
    # False below the open-set threshold calibrated for this model (no confident match).
    confident: bool = True


class MatchResponse(BaseModel):
    model_name: str
    model_version: str
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
    # One per uploaded image, in upload order.
    results: list[ImageMatches]
    reject_below: Optional[float] = None


class EmbedResponse(BaseModel):
    model_name: str
    model_version: str
    embedding: list[float]


class InfoResponse(BaseModel):
    model_name: str
    model_version: str
    index_checksum: str
    catalogue_size: int
    catalogue_skus: int
    embed_dim: int
    default_top_k: int
    # Photos of a /match_batch request embedded together (serve.batch_size when packaged).
    batch_size: int
    bento_model: str
    # How this process runs the model: BentoML worker processes, and torch threads in each.
    workers: int
    torch_threads: int


ImageUpload = Annotated[Path, Field(description="the query image file (JPEG, PNG, WebP...)")]
ImageUploads = Annotated[list[Path], Field(min_length=1, max_length=MAX_BATCH_IMAGES,
                                           description=f"1..{MAX_BATCH_IMAGES} query image files, the form "
                                                       "field repeated once per image")]
TopK = Annotated[Optional[Annotated[int, Field(ge=1, le=MAX_TOP_K)]],
                 Field(description=f"how many SKUs to return, 1..{MAX_TOP_K}; default: the packaged "
                                   f"serve.top_k ({DEFAULT_TOP_K} unless configured)")]


@bentoml.service(
    name=SERVICE_NAME,
    resources={"cpu": "2"},
    # One image per request on a CPU is milliseconds to ~100 ms (CLIP B/32); 30 s leaves room
    # for a cold start of the thread pool and large uploads.
    traffic={"timeout": 30},
)
class Matcher:
    """Match a product photo to catalogue SKUs with the packaged encoder and FAISS index."""

    bento_model = bentoml.models.BentoModel(bento_model_tag())

    def __init__(self) -> None:
        # Heavy imports here, not at module level: `bentoml build` imports this module only
        # to read the service definition.
        import torch

        from components.registry import load_served_model

        # BentoML does not share the CPUs out among workers, and torch gives every process a
        # thread per core: 2 workers on 2 cores served 0.37 times one worker's requests per
        # second (benchmarks/results/serving.md). So each worker takes its share of torch's
        # default; an explicit OMP_NUM_THREADS wins.
        self.workers = configured_workers(SERVICE_NAME)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads_per_worker(torch.get_num_threads(), self.workers))
        self.torch_threads = torch.get_num_threads()

        stored = self.bento_model
        facts: dict[str, Any] = {**stored.info.labels, **stored.info.metadata}
        missing = [key for key in REQUIRED_METADATA if not facts.get(key)]
        if missing:
            raise RuntimeError(f"bento model {stored.tag} lacks metadata {missing}; package it with "
                               "serving.build.package_model")
        folder = Path(stored.path)
        # IndexMismatchError propagates on purpose: a service must not start on a wrong index.
        self.model = load_served_model(folder / "encoder", folder / "index", str(facts["model_name"]),
                                       str(facts["model_version"]), str(facts["index_checksum"]),
                                       int(facts.get("batch_size") or DEFAULT_BATCH_SIZE))
        self.index_checksum = str(facts["index_checksum"])
        self.default_top_k = int(facts.get("default_top_k") or DEFAULT_TOP_K)
        self.bento_model_tag = str(stored.tag)
        LOGGER.info("serving %s version %s from %s (index %s, %d catalogue images; %d workers, %d torch threads "
                    "each)", self.model.model_name, self.model.version, stored.tag, self.index_checksum,
                    len(self.model.catalogue.sku_ids), self.workers, self.torch_threads)

    # /match and /embed are async on purpose, though they block while the model runs: BentoML
    # runs a sync API in a thread pool, and off the main thread torch's OpenMP intra-op threads
    # gave nothing (a served /match took x2.16 the in-process time; on the event loop's thread
    # x1.29-1.43, benchmarks/results/serving.md). One worker is CPU-bound either way, so requests
    # queue as before; health probes wait at most one inference (about 0.1 s here).
    @bentoml.api(route="/match")
    async def match(self, image: ImageUpload, top_k: TopK = None) -> MatchResponse:
        """The ``top_k`` best-matching catalogue SKUs for an image, best first, with cosine scores."""
        try:
            picture = decode_image(image)
        except BadImage as err:
            return _bad_request(str(err))
        found = self._image_matches([picture], top_k)[0]
        return MatchResponse(model_name=self.model.model_name, model_version=self.model.version,
                             matches=found.matches, no_confident_match=found.no_confident_match,
                             reject_below=self.model.reject_below)

    @bentoml.api(route="/match_batch")
    async def match_batch(self, images: ImageUploads, top_k: TopK = None) -> BatchMatchResponse:
        """``/match`` for several images in one request, results in upload order."""
        pictures, bad = [], []
        for position, upload in enumerate(images):
            try:
                pictures.append(decode_image(upload))
            except BadImage as err:
                # The position, not the file name: BentoML stores uploads under temporary names.
                bad.append({"index": position, "error": str(err)})
        if bad:
            return _bad_request(f"{len(bad)} of {len(images)} images could not be decoded; nothing was "
                                "matched, resend without them", bad_images=bad)
        return BatchMatchResponse(model_name=self.model.model_name, model_version=self.model.version,
                                  results=self._image_matches(pictures, top_k), reject_below=self.model.reject_below)

    def _image_matches(self, pictures: list, top_k: Optional[int]) -> list[ImageMatches]:
        found = []
        for hits in self.model.match(pictures, top_k or self.default_top_k):
            found.append(ImageMatches(matches=[Match(**hit) for hit in hits],
                                      no_confident_match=bool(hits) and not hits[0]["confident"]))
        return found

    @bentoml.api(route="/embed")
    async def embed(self, image: ImageUpload) -> EmbedResponse:
        """The unit-norm embedding of an image as a query: the vector ``/match`` searches the index with."""
        try:
            picture = decode_image(image)
        except BadImage as err:
            return _bad_request(str(err))
        vector = self.model.embed([picture])[0]
        return EmbedResponse(model_name=self.model.model_name, model_version=self.model.version,
                             embedding=[float(x) for x in vector])

    @bentoml.api(route="/info")
    def info(self) -> InfoResponse:
        """What is being served: model, version, index checksum and catalogue size."""
        catalogue = self.model.catalogue
        return InfoResponse(model_name=self.model.model_name, model_version=self.model.version,
                            index_checksum=self.index_checksum, catalogue_size=len(catalogue.sku_ids),
                            catalogue_skus=len(set(catalogue.sku_ids)), embed_dim=catalogue.dim,
                            default_top_k=self.default_top_k, batch_size=self.model.batch_size,
                            bento_model=self.bento_model_tag,
                            workers=self.workers, torch_threads=self.torch_threads)


# Checks multipart bodies before BentoML parses them (see serving.uploads for why).
Matcher.add_asgi_middleware(UploadGuard, file_fields={"/match": ("image",), "/match_batch": ("images",),
                                                      "/embed": ("image",)})
