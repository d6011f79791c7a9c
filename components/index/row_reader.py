"""Reading chosen rows of an index's ``vectors.npy`` with ``pread`` rather than through its mapping.

A page fault on a file mapping maps the neighbouring cached pages too (the kernel's
fault-around, 64 KiB by default, whatever ``madvise`` says). Re-ranking reads a few hundred
random 512-byte rows a query, so through the mapping every worker's resident set would grow by
16 pages per row read: at 10M rows it passed the memory budget within a thousand queries.
``pread`` copies just the rows asked for; the file stays in the shared page cache, which the
kernel trims under pressure. It costs about 2 µs a row against 1 µs through the mapping, so an
index reads this way only where its rows do not fit the memory budget beside it
(:func:`components.index.policy.rerank_reads`, kept as ``rerank_reads`` in the meta).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np


class RowReader:
    """Rows of a 2-d ``.npy`` file, read with one ``pread`` each."""

    def __init__(self, path: str | Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        with open(path, "rb") as file:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                np.lib.format.read_magic(file), np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(file)
            self.offset = file.tell()
        if len(shape) != 2 or fortran_order:
            raise ValueError(f"{path} does not hold a C-ordered 2-d array")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(shape[1] * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (any shape of row numbers), as float32 of shape ``rows.shape + (d,)``."""
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        # One pread a row, joined once: a third faster than preadv into slots of an array.
        data = b"".join(os.pread(self.fd, self.row_bytes, self.offset + row * self.row_bytes) for row in flat.tolist())
        if len(data) != flat.size * self.row_bytes:
            raise OSError("short read: the vectors file was truncated")
        out = np.frombuffer(data, dtype=self.dtype).reshape(flat.size, self.shape[1])
        return out.astype(np.float32).reshape(*np.shape(rows), self.shape[1])
