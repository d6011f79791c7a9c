"""The leak check: query photos whose image also stands in a gallery, byte for byte or nearly.

Such a query is matched by its own copy, so it is reported and left out of the metrics. Near
copies (re-encoded, resized, slightly recoloured) are found by a 64-bit difference hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd


def perceptual_hashes(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """A 64-bit difference hash (dHash) and a SHA-256 of the bytes of each image.

    The dHash compares neighbouring pixels of a 9x8 grey thumbnail, so re-encoded, resized or
    slightly recoloured copies of a photo land within a few bits of each other.
    """
    from PIL import Image

    hashes, digests = np.zeros(len(paths), dtype=np.uint64), []
    for row, path in enumerate(paths):
        data = Path(path).read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
        with Image.open(path) as image:
            image.draft("L", (64, 64))  # JPEG decodes straight at a small scale: fast
            pixels = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
        bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
        hashes[row] = np.packbits(bits).view(">u8")[0]
    return hashes, digests


def find_leaks(gallery: pd.DataFrame, queries: pd.DataFrame, max_distance: int = 4) -> pd.DataFrame:
    """Queries whose image also stands in the gallery: exactly (same bytes) or nearly (dHash).

    Returns:
        One row per leaking (query, gallery) pair: ``query_path, gallery_path, kind``
        (``exact`` or ``near``) and ``distance`` (Hamming distance of the hashes, in bits).
    """
    columns = ["query_path", "gallery_path", "kind", "distance"]
    if gallery.empty or queries.empty:
        return pd.DataFrame(columns=columns)
    gallery_hashes, gallery_digests = perceptual_hashes(list(gallery["image_path"]))
    query_hashes, query_digests = perceptual_hashes(list(queries["image_path"]))
    differing = np.bitwise_xor(query_hashes[:, None], gallery_hashes[None, :])
    distance = (
        np.unpackbits(differing.view(np.uint8), axis=-1).reshape(len(query_hashes), len(gallery_hashes), 64).sum(-1)
    )
    same_bytes = np.asarray(query_digests)[:, None] == np.asarray(gallery_digests)[None, :]
    rows = []
    for q, g in zip(*np.nonzero(same_bytes | (distance <= max_distance))):
        rows.append(
            {
                "query_path": queries["image_path"].iat[q],
                "gallery_path": gallery["image_path"].iat[g],
                "kind": "exact" if same_bytes[q, g] else "near",
                "distance": int(distance[q, g]),
            }
        )
    return pd.DataFrame(rows, columns=columns)
