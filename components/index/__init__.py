"""The catalogue index: what the service searches, how it is chosen, and how its versions are made.

- ``catalogue_index``: :class:`CatalogueIndex` (a FAISS index, its SKU map and its exact float16
  vectors), building, saving, verified loading, adding and removing rows.
- ``catalogue_map``: each row's SKU and image path in a columnar file.
- ``policy``: ``index.factory: auto`` (which index for a catalogue size and memory budget) and the
  tuning of its search settings to a recall target.
- ``indexing``: index versions from a registered model: embedding a catalogue, ``index add`` /
  ``remove``, and opening what the service serves.
- ``milvus``: the same interface on a Milvus collection, for catalogues that outgrow one host.

The names below are what the rest of skumatch needs; everything else is imported from its module.
"""

from components.index.catalogue_index import (
    INDEX_FILE,
    META_FILE,
    CatalogueIndex,
    IndexMismatchError,
    build_index,
    load_index,
    save_index,
    with_rows,
    without_skus,
)

__all__ = [
    "INDEX_FILE",
    "META_FILE",
    "CatalogueIndex",
    "IndexMismatchError",
    "build_index",
    "load_index",
    "save_index",
    "with_rows",
    "without_skus",
]
