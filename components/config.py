"""One typed parameter tree for every stage, read from ``params.yaml``.

YAML gives the defaults, ``key=value`` overrides (dotted paths, as in ``dvc exp run -S``)
change them, and the resolved tree is written next to every artifact it produced. Unknown
keys and badly typed values are rejected with the offending path in the message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    # Unknown keys are typos in params.yaml; fail loudly instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Section):
    """Where the dataset is and which splits play which part."""

    root: str = "../shared/datasets/grocery-store"
    layout: Literal["auto", "grocery", "imagefolder", "manifest"] = "auto"
    train_split: str = "train"
    query_split: str = "val"
    # An optional cap on images per SKU per split, for quick runs on a subset; None = all.
    max_images_per_sku: int | None = Field(default=None, ge=1)


class ValidationParams(_Section):
    """Rules the Great Expectations checkpoint enforces before any training."""

    min_width: int = Field(default=32, ge=1)
    min_height: int = Field(default=32, ge=1)
    min_images_per_sku: int = Field(default=1, ge=1)
    # None accepts any split name made of letters, digits, '-' and '_'.
    allowed_splits: list[str] | None = None
    allowed_roles: list[str] = ["catalogue", "query"]
    require_catalogue_image: bool = True


class ModelParams(_Section):
    """The encoder: backbone, projection and input size."""

    backbone: Literal["efficientnet-lite0", "efficientnet-lite2", "hf-clip"] = "efficientnet-lite0"
    # Used when backbone == "hf-clip": a Hugging Face model id or a local directory.
    hf_model_id: str = "openai/clip-vit-base-patch32"
    pretrained: bool = True
    # 0 keeps the backbone's own feature size (no projection layer).
    embed_dim: int = Field(default=256, ge=0)
    # None takes the backbone's native resolution.
    image_size: int | None = Field(default=None, ge=8)
    # At inference (evaluation, index, service) average each image's embedding with its mirror image's.
    flip_tta: bool = True
    # Query-side test-time zooms: a query photo is also embedded from the centre `zoom` of its short
    # side, and the embeddings averaged; gallery images stay at zoom 1.
    query_zooms: list[Annotated[float, Field(gt=0, le=1)]] = Field(default=[1.0], min_length=1)


class LossParams(_Section):
    """The training objective: a margin softmax over SKUs plus a loss against catalogue anchors."""

    kind: Literal["arcface", "subcenter-arcface", "cosface"] = "arcface"
    margin: float = Field(default=0.35, ge=0)
    scale: float = Field(default=16.0, gt=0)
    # Prototypes per SKU for subcenter-arcface: tolerates SKUs whose photos look unlike each other.
    subcenters: int = Field(default=3, ge=1)
    # Partial FC: with more SKUs than this, a step's softmax scores the batch's SKUs and random
    # others up to this many, so a step costs what it does at about this many SKUs; 0: all, always.
    sampled_classes: int = Field(default=1024, ge=0)
    # Weight of the loss that ranks each photo's catalogue image above other SKUs' (the
    # catalogue protocol's own task); 0 turns it off.
    catalogue_anchor_weight: float = Field(default=1.0, ge=0)
    # Crop stage: steps between re-embeddings of the catalogue anchors (the projection moves every step).
    anchor_refresh_steps: int = Field(default=20, ge=1)


class SamplerParams(_Section):
    """Which images each step sees: P x K batches (P SKUs, K images each) and catalogue anchors."""

    # Head stage batch (P * K, rounded down).
    batch_size: int = Field(default=64, ge=2)
    images_per_sku: int = Field(default=2, ge=1)
    # Crop stage batch: full backprop through the backbone, so smaller.
    unfrozen_batch_size: int = Field(default=32, ge=2)
    # Add each batch SKU's catalogue image (augmented) to every crop-stage batch.
    catalogue_in_batches: bool = False
    # Catalogue images each step's anchor loss ranks photos against: the step's own SKUs' plus
    # others drawn at random, up to this many (None = all). Bounds a step's cost on large catalogues.
    anchor_sample: int | None = Field(default=1024, ge=1)


class AugmentParams(_Section):
    """Shelf-like augmentation of the training images, and the views the head stage caches."""

    enabled: bool = True
    # Random-resized crop area, as fractions of the image (stage 1's augmented views, stage 2's crops).
    crop_area: list[Annotated[float, Field(gt=0, le=1)]] = Field(default=[0.35, 1.0], min_length=2, max_length=2)
    # Largest per-channel gain change of a white-balance cast (0 = none; 0.1 = gains in [0.9, 1.1]).
    colour_cast: float = Field(default=0.0, ge=0, lt=1)
    # Chance of hiding a random rectangle of a crop under one colour (random erasing; 0 = never).
    erase: float = Field(default=0.0, ge=0, le=1)
    # Crop stage input size (None = the model's input size): lower than at test time, as FixRes found.
    image_size: int | None = Field(default=None, ge=8)
    # Head stage: cached views per training image (1 = as is, 2 = + mirrored, more = + shelf
    # augmentations) and per catalogue image (the few catalogue images get many).
    cached_views: int = Field(default=2, ge=1)
    catalogue_views: int = Field(default=16, ge=1)

    @field_validator("crop_area")
    @classmethod
    def _smallest_area_first(cls, area: list[float]) -> list[float]:
        if area[0] > area[1]:
            raise ValueError(f"crop_area is [smallest, largest] fraction of the image; got {area}")
        return area


class ScheduleParams(_Section):
    """How long and how fast: the head stage on cached features, then the backbone on crops."""

    epochs: int = Field(default=18, ge=1)
    # Epochs with the backbone frozen (only the projection and head train); after them the
    # backbone's last `unfreeze_blocks` stages train too (-1 = all of it).
    frozen_epochs: int = Field(default=10, ge=0)
    # What the frozen epochs train on: "cached" backbone features (computed once), or live
    # augmented "crops" through the frozen backbone.
    frozen_stage: Literal["cached", "crops"] = "cached"
    unfreeze_blocks: int = Field(default=-1, ge=-1)
    lr: float = Field(default=1e-3, gt=0)
    # The backbone's peak learning rate: warmed up over `warmup_steps`, then a cosine to zero.
    backbone_lr: float = Field(default=3e-4, ge=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    # BatchNorm keeps its pretrained statistics (small P x K batches make poor batch statistics).
    freeze_batchnorm: bool = True
    # Moving average of the encoder's weights over the crop steps (0 = off); the average is saved.
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    # Validate every this many epochs and after the last; changes no weight.
    eval_every_epochs: int = Field(default=2, ge=1)


class TrainIOParams(_Section):
    """Where training writes, whether it resumes, and what it keeps in memory: speed, never results."""

    checkpoint_dir: str = "checkpoints"
    output_dir: str = "models/encoder"
    resume: bool = True
    # Decoded training images kept in memory for the crop stage, in MiB (143 KiB each at 192 px
    # crops); images beyond it are decoded again when drawn, by `loader_workers` processes.
    decoded_cache_mb: int = Field(default=8192, ge=0)
    loader_workers: int = Field(default=0, ge=0)


# Where each key of the flat `train` section of earlier params files lives now.
_MOVED_TRAIN_KEYS = {
    **{
        key: f"loss.{key}"
        for key in ("margin", "scale", "subcenters", "catalogue_anchor_weight", "anchor_refresh_steps")
    },
    "loss": "loss.kind",
    **{
        key: f"sampler.{key}"
        for key in ("batch_size", "images_per_sku", "unfrozen_batch_size", "catalogue_in_batches", "anchor_sample")
    },
    "augment": "augment.enabled",
    **{
        key: f"augment.{key}"
        for key in ("crop_area", "colour_cast", "erase", "image_size", "cached_views", "catalogue_views")
    },
    **{
        key: f"schedule.{key}"
        for key in (
            "epochs",
            "frozen_epochs",
            "frozen_stage",
            "unfreeze_blocks",
            "lr",
            "backbone_lr",
            "weight_decay",
            "warmup_steps",
            "freeze_batchnorm",
            "ema_decay",
            "eval_every_epochs",
        )
    },
    **{key: f"io.{key}" for key in ("checkpoint_dir", "output_dir", "resume", "decoded_cache_mb", "loader_workers")},
}


class TrainParams(_Section):
    """Fine-tuning recipe, grouped as the code is: loss, sampler, augment, schedule, io.

    The defaults are params.yaml's measured recipe, so that a tree built in code trains what
    the retrain flow trains; only its crop size (``augment.image_size``), chosen for one
    backbone, stays the model's own here.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    loss: LossParams = LossParams()
    sampler: SamplerParams = SamplerParams()
    augment: AugmentParams = AugmentParams()
    schedule: ScheduleParams = ScheduleParams()
    io: TrainIOParams = TrainIOParams()

    @model_validator(mode="before")
    @classmethod
    def _name_moved_keys(cls, raw: Any) -> Any:
        # A flat key of an earlier params file (or an old -S override) is refused with its new
        # place, rather than moved silently: `train.loss=cosface` would replace the whole section.
        if isinstance(raw, dict):
            moved = [
                f"train.{key} is now train.{_MOVED_TRAIN_KEYS[key]}"
                for key, value in raw.items()
                if key in _MOVED_TRAIN_KEYS and not (key in cls.model_fields and isinstance(value, dict))
            ]
            if moved:
                raise ValueError("; ".join(moved))
        return raw

    def flat(self) -> dict[str, Any]:
        """The recipe as the flat mapping of earlier params files, for fingerprints that must not change."""
        flat: dict[str, Any] = {"device": self.device, "seed": self.seed}
        for old, new in _MOVED_TRAIN_KEYS.items():
            group, name = new.split(".")
            flat[old] = getattr(getattr(self, group), name)
        return flat


class EvaluateParams(_Section):
    """Evaluation protocols and the promotion gate."""

    # Images embedded together by evaluation, index builds and the feature cache; small batches
    # are faster per image on a CPU, with the same embeddings. On a GPU, raise it.
    batch_size: int = Field(default=4, ge=1)
    ks: list[int] = [1, 3, 5]
    # Metrics come from each query's nearest gallery images, never a queries x gallery matrix, so
    # memory stays flat in the gallery size: mAP is mAP@neighbours (the full mAP on galleries
    # this small or smaller), and top-k searches further where images of few SKUs fill the list.
    neighbours: int = Field(default=1000, ge=1)
    # Delta similarity subtracts the mean score of this many random other SKUs per query (of all
    # of them where there are no more).
    delta_other_skus: int = Field(default=100, ge=1)
    # Each model's evaluation embeddings are kept here per data version, so a champion compared
    # again on the same data is not embedded again. null turns the cache off.
    embedding_cache_dir: str | None = ".skumatch/embeddings"
    # The protocol whose numbers the gate reads: "catalogue" is the real matching setting.
    gate_protocol: Literal["catalogue", "nn"] = "catalogue"
    min_top1: float = Field(default=0.5, ge=0, le=1)
    min_top3: float = Field(default=0.7, ge=0, le=1)
    # How much worse than @champion (absolute, on the same data) a challenger may be.
    champion_tolerance: float = Field(default=0.01, ge=0, le=1)
    metrics_path: str = "reports/metrics.json"
    # Queries within this many bits (of 64) of a gallery image's perceptual hash, or with the
    # same bytes, are leaks: reported and left out of the metrics. null skips the check.
    leak_max_distance: int | None = Field(default=4, ge=0, le=64)
    # The retrain flow's run plots (training curves, a t-SNE map, worst confusions). The map and
    # the confusions embed the queries a second time: off for quick runs and very large catalogues.
    plots: bool = True


class EmbeddingParams(_Section):
    """Embedding catalogues (index builds, ``rebuild_index``, ``index add``): the production embedder
    (``components/embedder.py``), in shards, resumable, on Dask workers."""

    # What runs the model: "torch" (inference mode), or ONNX Runtime on the CPU in float32 ("onnx")
    # or int8 ("onnx-int8", calibrated on catalogue images). The index keeps the graph that made
    # its vectors, and the service embeds queries with it (benchmarks/results/embedding.md).
    runtime: Literal["torch", "onnx", "onnx-int8"] = "onnx"
    # Images per model call, and threads decoding the next images meanwhile (0: none ahead).
    batch_size: int = Field(default=4, ge=1)
    decode_threads: int = Field(default=2, ge=0)
    # Catalogue images the int8 graph's activation ranges are calibrated on.
    calibration_images: int = Field(default=64, ge=1)
    # ONNX graphs are made here, once per model's weights.
    graph_dir: str = ".skumatch/graphs"

    # Images a shard holds: each finished shard is a file, so a killed run loses at most one.
    shard_size: int = Field(default=10_000, ge=1)
    # Shards are kept here until the index is saved; a run killed before resumes from them.
    shard_dir: str = ".skumatch/shards"
    # A local Dask cluster of this many worker processes, each with this many torch threads
    # (workers x threads = the cores); 0 embeds in the flow's own process.
    dask_workers: int = Field(default=2, ge=0)
    torch_threads_per_worker: int = Field(default=1, ge=1)
    # The scheduler of an existing Dask cluster ("tcp://host:8786"): production; wins over dask_workers.
    dask_address: str | None = None


class IndexParams(_Section):
    """The catalogue index: which one, how hard it searches, and where it lives."""

    # "auto" picks from the catalogue size, the embedding size and memory_budget_mb
    # (components/index/policy.py); or a faiss.index_factory string (inner product = cosine).
    factory: str = "auto"
    # Resident memory the index and its SKU map may take on a serving host.
    memory_budget_mb: int = Field(default=1536, ge=1)
    # Catalogues up to this many images are searched exactly (Flat): about 8 ms a query at 100k.
    exact_max_vectors: int = Field(default=100_000, ge=1)
    # Search settings are tuned to the least work that reaches this recall@10 of SKUs against
    # exact search, on held-out catalogue vectors; the recall reached is kept with the index.
    tune: bool = True
    target_recall: float = Field(default=0.97, gt=0, le=1)
    tune_sample: int = Field(default=1000, ge=10)
    # Tuning queries are held-out catalogue vectors turned to this cosine with themselves: a
    # shelf photo is farther from its catalogue image than catalogue images are from each other.
    tune_query_cosine: float = Field(default=0.7, gt=0, lt=1)
    # Compressed codes (PQ) re-score this many times the neighbours a search needs with the
    # exact float16 vectors kept beside the index.
    rerank_factor: int = Field(default=4, ge=1)
    # IVF lists visited per search (IVF factories only); FAISS's default of 1 loses recall.
    nprobe: int = Field(default=16, ge=1)
    # Candidates an HNSW search explores (HNSW factories only); FAISS's default of 16 loses recall.
    ef_search: int = Field(default=128, ge=1)
    use_gpu: Literal["auto", "never"] = "auto"
    output_dir: str = "models/index"
    # Where the service searches: the FAISS files packed with the model, or a Milvus collection
    # filled from them for catalogues beyond one host (milvus_uri: a cluster's http://host:19530,
    # or a Milvus Lite file; the token comes from MILVUS_TOKEN, never from this file).
    backend: Literal["faiss", "milvus"] = "faiss"
    milvus_uri: str = ""
    milvus_index_type: str = "HNSW"

    @model_validator(mode="after")
    def _milvus_needs_a_uri(self) -> IndexParams:
        if self.backend == "milvus" and not self.milvus_uri:
            raise ValueError("index.backend milvus needs index.milvus_uri")
        return self


class RegistryParams(_Section):
    """Where runs and model versions are recorded."""

    # Empty = the embedded default (SQLite store + local artifact root under .skumatch/).
    tracking_uri: str = ""
    experiment: str = "skumatch"
    model_name: str = "skumatch-encoder"
    # Promote a challenger that passed the gate to @champion at the end of the flow.
    auto_promote: bool = True


class UploadLimits(_Section):
    """What one request to the service may carry; each refusal is a 4xx naming the limit."""

    # A camera photo is a few MiB; the request limit also bounds what the guard buffers.
    max_upload_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # Checked from the image header before any pixel is decoded (a 50 MP photo decodes to 150 MB).
    max_pixels: int = Field(default=50_000_000, ge=1)
    # Longest side over shortest: a 1 x 60000 strip would be scaled up to 224 x 13 million pixels.
    max_aspect_ratio: float = Field(default=20.0, ge=1)
    # Pillow format names the decoder may try; anything else is refused unread.
    formats: list[str] = Field(default=["JPEG", "PNG", "WEBP"], min_length=1)
    # Photos in one /match_batch request.
    max_images_per_request: int = Field(default=64, ge=1)

    @field_validator("formats")
    @classmethod
    def _upper_case(cls, formats: list[str]) -> list[str]:
        return [name.upper() for name in formats]


class BatchingParams(_Section):
    """How the service's inference thread groups concurrent requests into one model call."""

    # Images of queued requests embedded in one call (a request is never split); 1 = no batching.
    max_images: int = Field(default=16, ge=1)
    # How long the first queued request may wait for others to join its batch; 0 = take only
    # what is already queued (no added latency, the right choice on a CPU).
    max_wait_ms: float = Field(default=0.0, ge=0, le=1000)


class ServeParams(_Section):
    """The matching service."""

    top_k: int = Field(default=5, ge=1)
    # Photos embedded per forward pass; small batches are faster per image on a CPU. On a GPU, raise it.
    batch_size: int = Field(default=2, ge=1)
    bento_model_name: str = "skumatch-matcher"
    # Interface and port of `skumatch serve`; 0.0.0.0 exposes the service to the network.
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=1, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Threads of each worker that embed side by side, sharing the worker's torch threads out;
    # auto: one per torch thread on a CPU (faster than one call on all of them), one on a GPU.
    lanes: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Seconds between checks of the registry's @champion for a new model or index (0 = only
    # when POST /admin/reload asks).
    reload_poll_seconds: float = Field(default=0.0, ge=0)
    # Side of the catalogue thumbnails packed with the model for the explorer page (0 = none).
    thumbnail_px: int = Field(default=128, ge=0, le=512)
    limits: UploadLimits = UploadLimits()
    batching: BatchingParams = BatchingParams()


class Params(_Section):
    """The whole tree; one section per stage."""

    data: DataParams = DataParams()
    validation: ValidationParams = ValidationParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    embedding: EmbeddingParams = EmbeddingParams()
    index: IndexParams = IndexParams()
    registry: RegistryParams = RegistryParams()
    serve: ServeParams = ServeParams()


class ParamsError(ValueError):
    """A params file or override that does not fit the tree."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw params mapping.

    Values are parsed as YAML scalars (``3``, ``0.1``, ``true``, ``[1, 3]``), so types come
    out as the tree expects; pydantic checks them afterwards.

    Raises:
        ParamsError: an override without ``=`` or naming no key path.
    """
    result = json.loads(json.dumps(raw))  # deep copy of plain data
    for override in overrides:
        if "=" not in override:
            raise ParamsError(f"override {override!r} is not of the form section.key=value")
        dotted, _, text = override.partition("=")
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ParamsError(f"override {override!r} names no key")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {override!r}: {key!r} is not a section")
        # Text fields take the text as typed: experiment "2024" or a path "on" stay strings.
        node[keys[-1]] = text if _expects_text(keys) else yaml.safe_load(text)
    return result


def _expects_text(keys: list[str]) -> bool:
    """Whether the field at ``keys`` is a plain string field of the params tree."""
    model: Any = Params
    for key in keys:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return False
        model = field.annotation
    return model is str


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read the params tree from YAML, apply overrides and validate.

    Args:
        path: a ``params.yaml``; ``None`` or a missing default file gives the built-in defaults.
        overrides: ``section.key=value`` strings applied on top of the file.

    Raises:
        ParamsError: unreadable YAML, unknown keys or values of the wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ParamsError(f"{path}: not valid YAML: {err}") from err
            if not isinstance(raw, dict):
                raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        elif path.name != "params.yaml":
            raise ParamsError(f"params file {path} does not exist")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ParamsError(f"invalid params: {problems}") from err


def flatten_params(params: Params) -> dict[str, str]:
    """Flatten the tree to dotted paths (``train.schedule.epochs``) -> str, for experiment trackers."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk("", params.model_dump())
    return flat
