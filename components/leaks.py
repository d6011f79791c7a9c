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

    Pairs come from a FAISS binary index of the gallery's hashes (an exact Hamming range search),
    so memory grows with the gallery and the leaks found, not with queries x gallery. Same bytes
    give the same hash, so exact copies are among them, told apart by their SHA-256.

    Returns:
        One row per leaking (query, gallery) pair, in query then gallery order: ``query_path,
        gallery_path, kind`` (``exact`` or ``near``) and ``distance`` (Hamming distance of the
        hashes, in bits).
    """
    import faiss

    columns = ["query_path", "gallery_path", "kind", "distance"]
    if gallery.empty or queries.empty:
        return pd.DataFrame(columns=columns)
    gallery_hashes, gallery_digests = perceptual_hashes(list(gallery["image_path"]))
    query_hashes, query_digests = perceptual_hashes(list(queries["image_path"]))
    index = faiss.IndexBinaryFlat(64)
    index.add(_hash_bytes(gallery_hashes))
    limits, distances, found = index.range_search(_hash_bytes(query_hashes), max_distance + 1)  # radius is strict
    query_rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
    order = np.lexsort((found, query_rows))
    query_rows, found, distances = query_rows[order], found[order], distances[order]
    exact = np.asarray(query_digests, dtype=object)[query_rows] == np.asarray(gallery_digests, dtype=object)[found]
    return pd.DataFrame(
        {
            "query_path": queries["image_path"].to_numpy()[query_rows],
            "gallery_path": gallery["image_path"].to_numpy()[found],
            "kind": np.where(exact, "exact", "near"),
            "distance": distances.astype(int),
        },
        columns=columns,
    )


def _hash_bytes(hashes: np.ndarray) -> np.ndarray:
    """64-bit hashes as the ``(n, 8)`` bytes a FAISS binary index takes."""
    return np.ascontiguousarray(hashes.astype(">u8")).view(np.uint8).reshape(-1, 8)
