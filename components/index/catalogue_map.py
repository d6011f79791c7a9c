"""Which SKU and catalogue image each index row holds: columnar, memory-mapped, shared by workers.

An index folder's ``items.arrow`` is an Arrow IPC file with two columns, ``sku_id``
(dictionary-encoded: an int32 code per row and a table of distinct SKUs) and ``image_path``.
It is read memory-mapped and zero-copy, so a catalogue of 10M rows costs the serving processes
shared page cache rather than Python strings of their own; a row's SKU is decoded only when a
search returns it. Folders saved before hold ``items.json`` (two lists), which still loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

ITEMS_FILE = "items.arrow"
LEGACY_ITEMS_FILE = "items.json"


class CatalogueMap:
    """Row -> SKU id and catalogue image path."""

    def __init__(self, sku_codes: np.ndarray, sku_names: pa.Array, image_paths: pa.Array) -> None:
        if not (len(sku_codes) == len(image_paths)):
            raise ValueError("every row needs a SKU and an image path")
        self.sku_codes, self.sku_names, self.image_paths = sku_codes, sku_names, image_paths

    @classmethod
    def from_lists(cls, sku_ids: list[str], image_paths: list[str]) -> CatalogueMap:
        """A map of in-memory lists (a build), dictionary-encoded as it will be saved."""
        if len(sku_ids) != len(image_paths):
            raise ValueError("sku_ids and image_paths must have the same length")
        encoded = pa.array([str(sku) for sku in sku_ids], pa.string()).dictionary_encode()
        return cls(
            encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            encoded.dictionary,
            # 64-bit offsets: 100M paths pass 2 GiB of text.
            pa.array([str(path) for path in image_paths], pa.large_string()),
        )

    def __len__(self) -> int:
        return len(self.sku_codes)

    @property
    def sku_count(self) -> int:
        """Distinct SKUs."""
        return len(self.sku_names)

    def sku(self, row: int) -> str:
        """The SKU id of index row ``row``."""
        return self.sku_names[int(self.sku_codes[row])].as_py()

    def image_path(self, row: int) -> str:
        """The catalogue image of index row ``row`` (a build machine's path)."""
        return self.image_paths[int(row)].as_py()

    def rows(self) -> Iterator[tuple[str, str]]:
        """Every row's (SKU id, image path), in row order."""
        names = self.sku_names.to_pylist()
        for code, path in zip(self.sku_codes.tolist(), self.image_paths.to_pylist()):
            yield names[code], path

    def sku_ids(self) -> list[str]:
        """Every row's SKU id as a list: for small catalogues and tests (10M rows is a lot of strings)."""
        return [sku for sku, _ in self.rows()]

    def codes_of(self, sku_ids: list[str]) -> np.ndarray:
        """The codes of these SKU ids (``-1`` for one the map does not hold)."""
        import pyarrow.compute as pc

        found = pc.index_in(pa.array([str(sku) for sku in sku_ids], pa.string()), value_set=self.sku_names)
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def holds_paths(self, image_paths: list[str]) -> np.ndarray:
        """Which of these image paths some row already holds (a boolean per path)."""
        import pyarrow.compute as pc

        wanted = pa.array([str(path) for path in image_paths], pa.large_string())
        return pc.is_in(wanted, value_set=self.image_paths).to_numpy(zero_copy_only=False)

    def extended(self, sku_ids: list[str], image_paths: list[str]) -> CatalogueMap:
        """This map with rows appended; new SKUs join the SKU table after the known ones."""
        if len(sku_ids) != len(image_paths):
            raise ValueError("sku_ids and image_paths must have the same length")
        known = self.codes_of(sku_ids)
        new_names = list(dict.fromkeys(str(sku) for sku, code in zip(sku_ids, known) if code < 0))
        names = pa.concat_arrays([self.sku_names.cast(pa.string()), pa.array(new_names, pa.string())])
        position = {name: self.sku_count + i for i, name in enumerate(new_names)}
        added = np.array(
            [code if code >= 0 else position[str(sku)] for sku, code in zip(sku_ids, known)], dtype=np.int32
        )
        paths = pa.concat_arrays([self.image_paths, pa.array([str(p) for p in image_paths], pa.large_string())])
        return CatalogueMap(np.concatenate([np.asarray(self.sku_codes, np.int32), added]), names, paths)

    def taking(self, keep: np.ndarray) -> CatalogueMap:
        """The rows where ``keep`` is true, in order; SKUs left without rows leave the SKU table."""
        codes = np.asarray(self.sku_codes)[keep]
        used, compact = np.unique(codes, return_inverse=True)
        return CatalogueMap(
            compact.astype(np.int32),
            self.sku_names.take(pa.array(used, pa.int64())),
            self.image_paths.filter(pa.array(keep)),
        )

    def write(self, path: Path) -> Path:
        """Save as an Arrow IPC file (uncompressed, so it can be mapped), normally ``folder/items.arrow``."""
        column = pa.DictionaryArray.from_arrays(pa.array(self.sku_codes, pa.int32()), self.sku_names)
        table = pa.table({"sku_id": column, "image_path": self.image_paths})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return path

    @classmethod
    def read(cls, folder: Path) -> CatalogueMap:
        """Read ``items.arrow`` memory-mapped (or an older folder's ``items.json``)."""
        if not (folder / ITEMS_FILE).exists() and (folder / LEGACY_ITEMS_FILE).exists():
            items = json.loads((folder / LEGACY_ITEMS_FILE).read_text())
            return cls.from_lists(items["sku_ids"], items["image_paths"])
        table = pa.ipc.open_file(pa.memory_map(str(folder / ITEMS_FILE), "r")).read_all()
        if table.column("sku_id").num_chunks != 1:  # one record batch is written; combining would copy
            table = table.combine_chunks()
        skus = table.column("sku_id").chunk(0)
        return cls(skus.indices.to_numpy(zero_copy_only=True), skus.dictionary, table.column("image_path").chunk(0))


def items_file(folder: Path) -> str:
    """The name of the map file a saved index folder holds (older folders: ``items.json``)."""
    return (
        ITEMS_FILE if (folder / ITEMS_FILE).exists() or not (folder / LEGACY_ITEMS_FILE).exists() else LEGACY_ITEMS_FILE
    )
