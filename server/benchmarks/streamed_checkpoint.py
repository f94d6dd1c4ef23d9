"""A ``torch.save``-compatible checkpoint written one tensor at a time, so that a synthetic 15 GB file costs one
tensor's worth of memory (the first-use benchmark's stand-in weights, :mod:`server.benchmarks.first_use`).

:class:`StreamingCheckpointWriter` writes ``torch.save``'s zip format (protocol-2 pickle, 64-byte-aligned stored
records, zip64) with each :class:`TensorSpec` leaf made by a ``fill`` (:class:`RandomFill`) just before its bytes
are written; the result reads back with ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ALIGN = 64
"""Data alignment of each record, as ``torch.save`` writes it (mmap-friendly)."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be made while writing: its shape and dtype; ``fill`` makes its values (contiguous)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()


_STORAGE_CLASSES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.int64: "LongStorage",
                    torch.int32: "IntStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage"}


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as ``torch.save`` pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        import collections

        stride, step = [], 1
        for size in reversed(self.shape):
            stride.insert(0, step)
            step *= size
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class StreamingCheckpointWriter:
    """Writes ``torch.save(obj, path)``'s zip format (protocol-2 pickle, 64-byte-aligned stored records, zip64) with
    every tensor made by ``fill`` just before its bytes are written and dropped right after, so memory stays at one
    tensor whatever the file's size. Leaves of ``obj`` may be :class:`TensorSpec` or real tensors.

    ``target_bytes`` (optional) pads the file to exactly that size with a last, unreferenced record ``padding``
    (which ``torch.load`` ignores), for a stand-in of a file whose every byte the known parts do not explain.
    """

    def __init__(self, path: Path, fill: Callable[[TensorSpec], torch.Tensor], target_bytes: int | None = None) -> None:
        self.path, self.fill, self.target_bytes = Path(path), fill, target_bytes
        self.archive = "archive"
        self._entries: list[tuple[bytes, int, int, int]] = []  # name, crc, size, local header offset
        self._offset = 0

    def write(self, obj: Any) -> int:
        """Write ``obj``; returns the file's size in bytes."""
        import pickle

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as self._file:
            self._record(".format_version", b"1")
            self._record(".storage_alignment", str(_ALIGN).encode())
            self._record("byteorder", sys.byteorder.encode())
            counter = iter(range(1 << 62))
            refs = self._write_tensors(obj, counter)
            payload = _pickle_dumps(refs, pickle)
            self._record("data.pkl", payload)
            self._record("version", b"3\n")
            self._record(".data/serialization_id", b"0" * 40)
            if self.target_bytes is not None:
                self._pad_to(self.target_bytes)
            self._central_directory()
        return self.path.stat().st_size

    def _write_tensors(self, obj: Any, counter: Iterator[int]) -> Any:
        if isinstance(obj, TensorSpec | torch.Tensor):
            tensor = self.fill(obj) if isinstance(obj, TensorSpec) else obj.detach().contiguous().cpu()
            key = str(next(counter))
            data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else np.empty(0, np.uint8)
            self._record(f"data/{key}", memoryview(data))
            return _TensorRef(_StorageRef(key, tensor.dtype, tensor.numel()), tuple(tensor.shape))
        if isinstance(obj, Mapping):
            return {k: self._write_tensors(v, counter) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._write_tensors(v, counter) for v in obj)
        return obj

    # Zip records (APPNOTE 6.3: local header + zip64 extra + alignment extra, stored, no data descriptor).
    def _local_header(self, name: bytes, crc: int, size: int, align: bool) -> bytes:
        zip64 = struct.pack("<HHQQ", 0x0001, 16, size, size)
        fixed = 30 + len(name) + len(zip64)
        pad = (-(self._offset + fixed + 4)) % _ALIGN if align else 0
        extra = zip64 + (struct.pack("<HH", 0x4246, pad) + b"Z" * pad if align else b"")
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name),
                           len(extra)) + name + extra

    def _record(self, name: str, data: bytes | memoryview) -> None:
        full = f"{self.archive}/{name}".encode()
        size = len(data) if isinstance(data, bytes) else data.nbytes
        crc = zlib.crc32(data)
        header = self._local_header(full, crc, size, align=True)
        self._entries.append((full, crc, size, self._offset))
        self._file.write(header)
        self._file.write(data)
        self._offset += len(header) + size

    def _pad_to(self, target: int) -> None:
        name = f"{self.archive}/padding".encode()
        directory = sum(46 + len(n) + 28 for n, *_ in self._entries) + 46 + len(name) + 28
        header = 30 + len(name) + 20  # unaligned: the size is then linear in the padding's length
        size = target - self._offset - header - directory - 56 - 20 - 22
        if size < 0:
            raise ValueError(f"the known parts already take {target - size:,} bytes, more than the {target:,} "
                             "asked for")
        crc, chunk, left = 0, bytes(16 * 2**20), size
        offset = self._offset
        self._file.write(self._local_header(name, 0, size, align=False))
        while left:  # zeros in 16 MiB pieces; the CRC is patched in afterwards
            piece = chunk[: min(left, len(chunk))]
            crc = zlib.crc32(piece, crc)
            self._file.write(piece)
            left -= len(piece)
        end = self._file.tell()
        self._file.seek(offset + 14)
        self._file.write(struct.pack("<I", crc))
        self._file.seek(end)
        self._entries.append((name, crc, size, offset))
        self._offset = end

    def _central_directory(self) -> None:
        start = self._offset
        for name, crc, size, offset in self._entries:
            extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)
            self._file.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF,
                                         0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + name + extra)
        end = self._file.tell()
        count = len(self._entries)
        self._file.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, end - start, start))
        self._file.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        self._file.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


def _pickle_dumps(obj: Any, pickle: Any) -> bytes:
    import io

    class Pickler(pickle.Pickler):
        def persistent_id(self, item: object) -> tuple | None:
            if isinstance(item, _StorageRef):
                return ("storage", getattr(torch, _STORAGE_CLASSES[item.dtype]), item.key, "cpu", item.numel)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


class RandomFill:
    """Tensor values for :class:`StreamingCheckpointWriter`: slices of one N(0, σ²) pool (so 15 GB of values cost one
    pool's worth of random numbers), at a rotating offset; integers are small counts. Returned tensors are views."""

    def __init__(self, pool_bytes: int = 128 * 2**20, std: float = 0.02, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(pool_bytes // 4, generator=generator) * std
        self.half_pool = self.pool.half()
        self.position = 0

    def __call__(self, spec: TensorSpec) -> torch.Tensor:
        numel = int(np.prod(spec.shape, dtype=np.int64))
        if not spec.dtype.is_floating_point:
            return torch.arange(numel, dtype=torch.int64).remainder(100).to(spec.dtype).reshape(spec.shape)
        pool = self.half_pool if spec.dtype == torch.float16 else self.pool
        if numel > pool.numel():  # e.g. CLIP's token embedding: tiled (one tensor's worth of memory)
            return pool.repeat(-(-numel // pool.numel()))[:numel].reshape(spec.shape)
        start = self.position % max(pool.numel() - numel, 1)
        self.position += 7919 * (numel % 1013 + 1)
        return pool[start : start + numel].to(spec.dtype).reshape(spec.shape)
