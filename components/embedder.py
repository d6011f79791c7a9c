"""The production embedder: image files or photos in, unit-norm embeddings out, as fast as the host allows.

It computes what the plain loop (:func:`components.model.embed_images`: decode, resize, batch, eager
forward) computes, by the means serious input pipelines use:

- decoding and resizing run on a thread pool a few batches ahead of the model (Pillow releases the
  GIL while it decodes and resamples), so the next batch is ready when the model finishes one;
- the model runs under ``torch.inference_mode``, or in ONNX Runtime on the CPU, in float32 or int8
  (static QDQ quantisation, per-channel weights, calibrated on catalogue images).

A model row is uint8 pixels in and one embedding out: the exported graph (:class:`PixelEncoder`)
holds normalisation, backbone, projection and L2 normalisation. Flip and zoom views are rows of
their own, pooled afterwards as :func:`components.model.embed_batch` pools them, so the service's
lanes (:mod:`components.matcher`) embed rows with the very same function. An index keeps the graph
that embedded its vectors (``embedder.onnx``), and the service embeds queries with that graph.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.model import Encoder, Preprocess, autocast_for

LOGGER = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
# The exported graphs, made once per model's weights (see runtime_model_path).
ONNX_FILES = {"onnx": "encoder.fp32.onnx", "onnx-int8": "encoder.int8.onnx"}

RowFn = Callable[[np.ndarray], np.ndarray]  # uint8 pixel rows (n, 3, s, s) -> float32 unit embeddings (n, d)


class PixelEncoder(nn.Module):
    """uint8 NCHW pixels -> unit-norm embeddings: normalisation, backbone, projection (the exported graph)."""

    def __init__(self, encoder: Encoder, preprocess: Preprocess) -> None:
        super().__init__()
        self.encoder = encoder
        # (x / 255 - mean) / std, folded into one subtraction and one division on 0-255 values.
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values = (pixels.float() - self.mean) / self.std
        return self.encoder.embed_features(self.encoder.features(values))


def torch_rows(encoder: Encoder, preprocess: Preprocess, device: torch.device | None = None) -> RowFn:
    """Rows embedded by the torch encoder under ``inference_mode`` (bf16 autocast on CUDA)."""
    device = device or next(encoder.parameters()).device
    module = PixelEncoder(encoder, preprocess).to(device).eval()

    def embed(pixels: np.ndarray) -> np.ndarray:
        # inference_mode is per thread: set here, not only by a caller on another thread.
        with torch.inference_mode(), autocast_for(device):
            return module(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

    return embed


def export_onnx(encoder: Encoder, preprocess: Preprocess, path: str | Path) -> Path:
    """Write the :class:`PixelEncoder` of ``encoder`` as an ONNX graph with a dynamic row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = PixelEncoder(encoder, preprocess).cpu().eval()
    sample = torch.zeros((2, 3, preprocess.image_size, preprocess.image_size), dtype=torch.uint8)
    partial = path.with_name(f"{path.name}.partial")
    with torch.no_grad():
        # The TorchScript exporter: the dynamo one needs onnxscript and takes minutes on this backbone.
        torch.onnx.export(
            module,
            (sample,),
            str(partial),
            input_names=["pixels"],
            output_names=["embeddings"],
            dynamic_axes={"pixels": {0: "rows"}, "embeddings": {0: "rows"}},
            opset_version=17,
            dynamo=False,
        )
    partial.replace(path)
    return path


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[np.ndarray]) -> Path:
    """Static int8 quantisation of an exported graph (QDQ, per-channel int8 weights, uint8 activations).

    Args:
        calibration: batches of uint8 pixel rows whose activation ranges set the scales; catalogue
            images, as the model will see them.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    prepared = int8_path.with_name(f"{int8_path.stem}.prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    partial = int8_path.with_name(f"{int8_path.name}.partial")
    quantize_static(
        str(prepared),
        str(partial),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    partial.replace(int8_path)
    return int8_path


def onnx_rows(path: str | Path, threads: int) -> RowFn:
    """Rows embedded by ONNX Runtime on the CPU with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads would take the cores the decode pool needs between two model calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": np.ascontiguousarray(pixels)})[0]

    return embed


@dataclass
class ImageEmbedder:
    """Embeds photos and image files with one row function, views pooled as the encoder pools them."""

    rows: RowFn
    preprocess: Preprocess
    embed_dim: int
    flip_average: bool
    query_zooms: tuple[float, ...]
    runtime: str = "torch"
    batch_size: int = 32  # images per model call
    decode_threads: int = 2  # 0: decode in the calling thread, between model calls

    def views(self, as_queries: bool) -> list[Preprocess]:
        """The crops an image is embedded at: every query zoom for a query, the full frame otherwise."""
        return [replace(self.preprocess, zoom=zoom) for zoom in self.query_zooms] if as_queries else [self.preprocess]

    def pixel_rows(self, image, as_queries: bool = False) -> np.ndarray:
        """uint8 rows of one PIL image: each view, followed by its mirror image when flips are averaged."""
        rows = []
        for view in self.views(as_queries):
            pixels = view.resize_crop(image).numpy()
            rows += [pixels, pixels[..., ::-1]] if self.flip_average else [pixels]
        return np.stack(rows)

    def pool(self, embedded: np.ndarray, as_queries: bool = False) -> np.ndarray:
        """One unit embedding per image from its rows: mirror with image, then across views."""
        flips = 2 if self.flip_average else 1
        views = embedded.reshape(-1, len(self.views(as_queries)), flips, embedded.shape[-1])
        per_view = _unit(views.sum(axis=2))
        return _unit(per_view.sum(axis=1)).astype(np.float32)

    def embed_rows(self, rows: np.ndarray) -> np.ndarray:
        """Unit embeddings of pixel rows, each alone, ``batch_size`` images' worth a model call."""
        per_call = self.batch_size * (2 if self.flip_average else 1)
        if len(rows) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.concatenate([self.rows(rows[start : start + per_call]) for start in range(0, len(rows), per_call)])

    def embed_images(self, images: list, as_queries: bool = False) -> np.ndarray:
        """Unit embeddings of PIL images, one row each (what :func:`components.model.embed_batch` returns)."""
        if not images:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        rows = np.concatenate([self.pixel_rows(image, as_queries) for image in images])
        return self.pool(self.embed_rows(rows), as_queries)

    def file_rows(self, path: str | Path, as_queries: bool = False) -> np.ndarray:
        """The pixel rows of an image file, fully decoded as the plain loop decodes it (a truncated file fails here)."""
        from components.data import load_rgb

        return self.pixel_rows(load_rgb(path), as_queries)

    def embed_paths(
        self,
        paths: list[str],
        as_queries: bool = False,
        out: np.ndarray | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Embed image files as float32 rows, in order (the arguments of :func:`components.model.embed_images`)."""
        from tqdm.auto import tqdm

        if out is not None and out.shape != (len(paths), self.embed_dim):
            raise ValueError(f"out has shape {out.shape}; {len(paths)} images need ({len(paths)}, {self.embed_dim})")
        target = np.zeros((len(paths), self.embed_dim), dtype=np.float32) if out is None else out
        decoded = self._decoded(paths, as_queries)
        with tqdm(total=len(paths), desc="embedding", disable=None if progress else True, leave=False) as bar:
            for start in range(0, len(paths), self.batch_size):
                batch = list(islice(decoded, self.batch_size))
                target[start : start + len(batch)] = self.pool(self.embed_rows(np.concatenate(batch)), as_queries)
                bar.update(len(batch))
        return target

    def _decoded(self, paths: list[str], as_queries: bool) -> Iterator[np.ndarray]:
        """Each file's pixel rows in order, decoded on the pool at most two batches ahead of the model."""
        if self.decode_threads == 0:
            yield from (self.file_rows(path, as_queries) for path in paths)
            return
        pending = iter(paths)
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            ahead = deque(
                pool.submit(self.file_rows, path, as_queries) for path in islice(pending, 2 * self.batch_size)
            )
            while ahead:
                rows = ahead.popleft().result()
                for path in islice(pending, 1):
                    ahead.append(pool.submit(self.file_rows, path, as_queries))
                yield rows


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def runtime_model_path(graph_dir: str | Path, model_dir: str | Path, runtime: str) -> Path:
    """Where the graph of an ONNX runtime for the saved encoder in ``model_dir`` is kept: under ``graph_dir``
    (``embedding.graph_dir``), in a folder named by the digest of the encoder's weights. Not in the encoder's
    folder, which may be another stage's output (DVC) or read-only."""
    from components.model import WEIGHTS_FILE

    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as weights:
        while chunk := weights.read(8 << 20):
            digest.update(chunk)
    return Path(graph_dir).expanduser() / digest.hexdigest()[:32] / ONNX_FILES[runtime]


def prepare_runtime(
    encoder: Encoder,
    preprocess: Preprocess,
    model_dir: str | Path,
    runtime: str,
    calibration_paths: list[str] | None = None,
    calibration_images: int = 64,
    graph_dir: str | Path = ".skumatch/graphs",
) -> Path | None:
    """Make the ONNX graph ``runtime`` runs for the encoder saved in ``model_dir``, unless it is made already.

    The int8 graph is calibrated on ``calibration_images`` of ``calibration_paths``, evenly spaced,
    the first time; later calls for the same weights read it.

    Returns:
        The graph's path, or None for the torch runtime.

    Raises:
        ValueError: an unknown runtime, or int8 without calibration images.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown embedding runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return None
    fp32 = runtime_model_path(graph_dir, model_dir, "onnx")
    if not fp32.exists():
        export_onnx(encoder, preprocess, fp32)
    if runtime == "onnx":
        return fp32
    int8 = runtime_model_path(graph_dir, model_dir, "onnx-int8")
    if not int8.exists():
        if not calibration_paths:
            raise ValueError(
                f"{model_dir} has no int8 graph and no calibration images were given to make one; "
                "embed with embedding.runtime onnx or torch, or pass catalogue images"
            )
        step = max(1, len(calibration_paths) // calibration_images)
        sample = calibration_paths[::step][:calibration_images]
        plain = ImageEmbedder(torch_rows(encoder, preprocess), preprocess, encoder.embed_dim, encoder.flip_average, ())
        quantize_onnx(fp32, int8, (plain.file_rows(path) for path in sample))
    return int8


def build_embedder(
    encoder: Encoder,
    preprocess: Preprocess,
    runtime: str = "torch",
    graph: str | Path | None = None,
    threads: int | None = None,
    batch_size: int = 4,
    decode_threads: int = 2,
) -> ImageEmbedder:
    """The embedder of ``encoder`` on ``runtime``: an ONNX runtime runs ``graph`` (see :func:`prepare_runtime`).

    On CUDA the torch runtime is used whatever is asked: the ONNX graphs here run on the CPU.

    Raises:
        ValueError: an unknown runtime, or an ONNX runtime without its graph.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown embedding runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    device = next(encoder.parameters()).device
    if runtime != "torch" and device.type != "cpu":
        LOGGER.info("encoder on %s: embedding with torch, not %s", device, runtime)
        runtime = "torch"
    if runtime == "torch":
        rows = torch_rows(encoder, preprocess, device)
    elif graph is None or not Path(graph).exists():
        raise ValueError(f"embedding runtime {runtime} needs its ONNX graph; {graph} does not exist")
    else:
        rows = onnx_rows(graph, threads or torch.get_num_threads())
    return ImageEmbedder(
        rows,
        preprocess,
        encoder.embed_dim,
        encoder.flip_average,
        encoder.query_zooms,
        runtime,
        batch_size,
        decode_threads,
    )


def embedder_for(
    encoder: Encoder,
    preprocess: Preprocess,
    params,
    model_dir: str | Path | None = None,
    calibration_paths: list[str] | None = None,
    threads: int | None = None,
) -> tuple[ImageEmbedder, Path | None]:
    """The embedder the ``embedding`` section (``params``) asks for, its graph made in ``model_dir`` if need be.

    Returns:
        ``(embedder, graph)``; the graph is None for the torch runtime.
    """
    graph = None
    if params.runtime != "torch":
        if model_dir is None:
            raise ValueError(f"embedding runtime {params.runtime} needs the encoder's folder for its graph")
        graph = prepare_runtime(
            encoder,
            preprocess,
            model_dir,
            params.runtime,
            calibration_paths,
            params.calibration_images,
            params.graph_dir,
        )
    embedder = build_embedder(
        encoder, preprocess, params.runtime, graph, threads, params.batch_size, params.decode_threads
    )
    return embedder, graph if embedder.runtime != "torch" else None
