"""The first real run at full size, on this machine: ``python -m server.benchmarks.first_use [--dir DIR] [--keep]``.

What an artist's first Generate does, measured phase by phase with synthetic weights of the real sizes and formats
(random values; nothing is downloaded):

1. ``write``: a synthetic ``zero123-xl.ckpt`` with the official file's key layout and byte size (15,465,973,531 B by
   default: the raw UNet, its EMA copy, the VAE, the whole OpenAI CLIP ViT-L/14 in half precision, AdamW's two moments
   for the UNet and ``cc_projection``, and an unreferenced ``padding`` record for the bytes the known parts do not
   explain), plus SAM ViT-H, LoFTR and reconstruction files in their published formats. Every tensor is written
   straight to disk as it is made (:class:`StreamingCheckpointWriter`), so writing needs about 0.3 GiB of RAM,
   whatever the file's size; the result reads back with ``torch.load(mmap=True)``.
2. ``convert``: :func:`server.stages.multiview.convert.ensure_converted` on the checkpoint, its pages first dropped
   from the page cache (cold cache, as after a download).
3. ``load``: ``One2345Pipeline.from_preset("paper", device="cpu")``: Zero123, reconstruction, SAM ViT-H and LoFTR.
4. ``generate``: the pipeline on a synthetic photo (SAM segments it) up to the end of stage 1's second DDIM step,
   then cancelled.

It prints one JSON line: per phase the peak RSS, the peak heap (RSS less file-backed pages: ``RssAnon + RssShmem``,
what the kernel cannot drop under pressure), the wall time and the change in disk use; the free RAM and disk before;
and the time from the start of conversion to the end of loading ("ready"). Peaks come from sampling
``/proc/self/status`` every 5 ms on a thread (PyTorch's kernels let go of the GIL), so they may miss a spike shorter
than that. Everything it wrote is deleted at the end unless ``--keep``.

``--tiny`` runs the same code on a tiny layout in seconds (the test suite does); it is not a measurement.
Needs Linux (``/proc``). Not part of the default test run: at full size it needs ~21 GB of disk and minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.stages.multiview.convert import (
    ZERO123_XL,
    LdmUNetConfig,
    LdmVaeConfig,
    OpenAIClipVisionConfig,
    Zero123Architecture,
)
from server.stages.sam_compat import import_segment_anything

GIB = 2**30
ZERO123_XL_BYTES = 15_465_973_531
"""The pinned size of the official ``zero123-xl.ckpt`` (the outside measurement's copy had 15,465,819,153 B)."""
FULL_DISK_BYTES = 21 * 10**9
"""Disk the full-size run needs at its peak: the checkpoint (15.5 GB), its conversion (5 GB), SAM (2.6 GB) less what
the order of writing frees (nothing: all stay until the end), rounded down from 23.1 GB because nothing else is
written; checked against ``shutil.disk_usage`` with 1 GB to spare."""
_ALIGN = 64
"""Data alignment of each record, as ``torch.save`` writes it (mmap-friendly)."""


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def read_memory() -> dict[str, int]:
    """This process's memory now, in bytes: ``rss`` (VmRSS), ``heap`` (RssAnon + RssShmem: RSS less file-backed
    pages) and ``file`` (RssFile: mapped file pages, e.g. a memory-mapped checkpoint)."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "heap": fields["RssAnon"] + fields.get("RssShmem", 0), "file": fields["RssFile"]}


def available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo``, bytes: what can be allocated without swapping."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line (Linux < 3.14)")


class PeakMemory:
    """Samples :func:`read_memory` on a thread while the ``with`` block runs; ``rss`` / ``heap`` are the peaks."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.rss = self.heap = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = read_memory()
        self.rss, self.heap = max(self.rss, now["rss"]), max(self.heap, now["heap"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Phase:
    """One measured phase."""

    peak_rss_gib: float = 0.0
    peak_heap_gib: float = 0.0
    wall_s: float = 0.0
    disk_delta_gb: float = 0.0
    """Change of the used bytes of the file system holding the work folder, GB (10⁹ B)."""


@dataclass
class Measurement:
    phases: dict[str, Phase] = dataclasses.field(default_factory=dict)

    def phase(self, name: str, disk_of: Path) -> _PhaseContext:
        return _PhaseContext(self, name, disk_of)


class _PhaseContext:
    def __init__(self, measurement: Measurement, name: str, disk_of: Path) -> None:
        self.measurement, self.name, self.disk_of = measurement, name, disk_of

    def __enter__(self) -> None:
        self.disk = _disk_used(self.disk_of)
        self.start = time.perf_counter()
        self.peak = PeakMemory().__enter__()

    def __exit__(self, *exc: object) -> None:
        self.peak.__exit__(*exc)
        self.measurement.phases[self.name] = Phase(
            peak_rss_gib=round(self.peak.rss / GIB, 2), peak_heap_gib=round(self.peak.heap / GIB, 2),
            wall_s=round(time.perf_counter() - self.start, 1),
            disk_delta_gb=round((_disk_used(self.disk_of) - self.disk) / 1e9, 2))
        print(f"  {self.name}: {dataclasses.asdict(self.measurement.phases[self.name])}", file=sys.stderr, flush=True)


def _disk_used(path: Path) -> int:
    usage = shutil.disk_usage(path)
    return usage.total - usage.free


# ---------------------------------------------------------------------------------------------------------------------
# A torch.save-compatible zip file written one tensor at a time


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


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts (written out from ldm/modules/diffusionmodules/{openaimodel,model}.py and clip/model.py; the converter's
# tests build their tiny checkpoints from these same lists)


def ldm_unet_shapes(c: LdmUNetConfig) -> dict[str, tuple[int, ...]]:
    """openaimodel.UNetModel parameter shapes (spatial transformers with conv proj_in/out, GEGLU feed-forward)."""
    s: dict[str, tuple[int, ...]] = {}
    mc, emb = c.model_channels, 4 * c.model_channels

    def linear(p: str, n_out: int, n_in: int, bias: bool = True) -> None:
        s[f"{p}.weight"] = (n_out, n_in)
        if bias:
            s[f"{p}.bias"] = (n_out,)

    def conv(p: str, n_out: int, n_in: int, k: int) -> None:
        s[f"{p}.weight"], s[f"{p}.bias"] = (n_out, n_in, k, k), (n_out,)

    def norm(p: str, ch: int) -> None:
        s[f"{p}.weight"], s[f"{p}.bias"] = (ch,), (ch,)

    def resblock(p: str, cin: int, cout: int) -> None:
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        linear(f"{p}.emb_layers.1", cout, emb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def spatial_transformer(p: str, ch: int) -> None:
        norm(f"{p}.norm", ch)
        conv(f"{p}.proj_in", ch, ch, 1)
        t = f"{p}.transformer_blocks.0"
        for attn, kv_in in (("attn1", ch), ("attn2", c.context_dim)):
            linear(f"{t}.{attn}.to_q", ch, ch, bias=False)
            linear(f"{t}.{attn}.to_k", ch, kv_in, bias=False)
            linear(f"{t}.{attn}.to_v", ch, kv_in, bias=False)
            linear(f"{t}.{attn}.to_out.0", ch, ch)
        linear(f"{t}.ff.net.0.proj", 8 * ch, ch)
        linear(f"{t}.ff.net.2", ch, 4 * ch)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{t}.{n}", ch)
        conv(f"{p}.proj_out", ch, ch, 1)

    linear("time_embed.0", emb, mc)
    linear("time_embed.2", emb, emb)
    conv("input_blocks.0.0", mc, c.in_channels, 3)
    skip_channels, ch, ds, k = [mc], mc, 1, 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            resblock(f"input_blocks.{k}.0", ch, mult * mc)
            ch = mult * mc
            if ds in c.attention_resolutions:
                spatial_transformer(f"input_blocks.{k}.1", ch)
            skip_channels.append(ch)
            k += 1
        if level != len(c.channel_mult) - 1:
            conv(f"input_blocks.{k}.0.op", ch, ch, 3)
            skip_channels.append(ch)
            k, ds = k + 1, ds * 2
    resblock("middle_block.0", ch, ch)
    spatial_transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    k = 0
    for level, mult in reversed(list(enumerate(c.channel_mult))):
        for i in range(c.num_res_blocks + 1):
            resblock(f"output_blocks.{k}.0", ch + skip_channels.pop(), mult * mc)
            ch, n = mult * mc, 1
            if ds in c.attention_resolutions:
                spatial_transformer(f"output_blocks.{k}.1", ch)
                n = 2
            if level and i == c.num_res_blocks:
                conv(f"output_blocks.{k}.{n}.conv", ch, ch, 3)
                ds //= 2
            k += 1
    norm("out.0", ch)
    conv("out.2", c.out_channels, mc, 3)
    return s


def ldm_vae_shapes(c: LdmVaeConfig) -> dict[str, tuple[int, ...]]:
    """ldm AutoencoderKL parameter shapes (Encoder/Decoder with mid attention only), without the prefix."""
    s: dict[str, tuple[int, ...]] = {}

    def conv(p: str, n_out: int, n_in: int, k: int) -> None:
        s[f"{p}.weight"], s[f"{p}.bias"] = (n_out, n_in, k, k), (n_out,)

    def norm(p: str, ch: int) -> None:
        s[f"{p}.weight"], s[f"{p}.bias"] = (ch,), (ch,)

    def resblock(p: str, cin: int, cout: int) -> None:
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def mid(p: str, ch: int) -> None:
        resblock(f"{p}.mid.block_1", ch, ch)
        norm(f"{p}.mid.attn_1.norm", ch)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", ch, ch, 1)
        resblock(f"{p}.mid.block_2", ch, ch)

    last = len(c.ch_mult) - 1
    conv("encoder.conv_in", c.ch, c.in_channels, 3)
    ch = c.ch
    for i, mult in enumerate(c.ch_mult):
        for j in range(c.num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", ch, c.ch * mult)
            ch = c.ch * mult
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3)
    mid("encoder", ch)
    norm("encoder.norm_out", ch)
    conv("encoder.conv_out", 2 * c.z_channels, ch, 3)
    conv("quant_conv", 2 * c.z_channels, 2 * c.z_channels, 1)
    conv("post_quant_conv", c.z_channels, c.z_channels, 1)
    ch = c.ch * c.ch_mult[-1]
    conv("decoder.conv_in", ch, c.z_channels, 3)
    mid("decoder", ch)
    for i in reversed(range(len(c.ch_mult))):
        for j in range(c.num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", ch, c.ch * c.ch_mult[i])
            ch = c.ch * c.ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", ch, ch, 3)
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", c.out_ch, ch, 3)
    return s


def openai_clip_shapes(c: OpenAIClipVisionConfig, text_width: int = 768, text_layers: int = 12,
                       vocab: int = 49408, context: int = 77) -> dict[str, tuple[int, ...]]:
    """clip.model.CLIP parameter shapes: the VisionTransformer under ``visual.`` and the text transformer (which the
    checkpoint carries and the converter ignores)."""

    def resblocks(prefix: str, w: int, layers: int) -> dict[str, tuple[int, ...]]:
        s: dict[str, tuple[int, ...]] = {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            s |= {f"{p}.attn.in_proj_weight": (3 * w, w), f"{p}.attn.in_proj_bias": (3 * w,),
                  f"{p}.attn.out_proj.weight": (w, w), f"{p}.attn.out_proj.bias": (w,),
                  f"{p}.ln_1.weight": (w,), f"{p}.ln_1.bias": (w,), f"{p}.mlp.c_fc.weight": (4 * w, w),
                  f"{p}.mlp.c_fc.bias": (4 * w,), f"{p}.mlp.c_proj.weight": (w, 4 * w), f"{p}.mlp.c_proj.bias": (w,),
                  f"{p}.ln_2.weight": (w,), f"{p}.ln_2.bias": (w,)}
        return s

    w, grid = c.width, c.image_resolution // c.patch_size
    shapes = {"positional_embedding": (context, text_width), "text_projection": (text_width, c.embed_dim),
              "logit_scale": (), "token_embedding.weight": (vocab, text_width), "ln_final.weight": (text_width,),
              "ln_final.bias": (text_width,)}
    shapes |= resblocks("transformer", text_width, text_layers)
    shapes |= {"visual.class_embedding": (w,), "visual.positional_embedding": (grid * grid + 1, w),
               "visual.proj": (w, c.embed_dim), "visual.conv1.weight": (w, 3, c.patch_size, c.patch_size),
               "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,), "visual.ln_post.weight": (w,),
               "visual.ln_post.bias": (w,)}
    shapes |= {f"visual.{k}": v for k, v in resblocks("transformer", w, c.layers).items()}
    return shapes


def zero123_checkpoint(arch: Zero123Architecture, *, text_width: int = 768, text_layers: int = 12,
                       vocab: int = 49408) -> dict[str, Any]:
    """The Lightning checkpoint of a Zero123 LatentDiffusion, leaves as :class:`TensorSpec` (real tensors for the
    schedule): ``state_dict`` (raw UNet, EMA copy, VAE, CLIP in fp16, ``cc_projection``, schedule buffers) and
    ``optimizer_states`` (AdamW's ``exp_avg`` and ``exp_avg_sq`` for every trained parameter: UNet + cc_projection)."""
    unet = {f"model.diffusion_model.{k}": v for k, v in ldm_unet_shapes(arch.unet).items()}
    cc = {"cc_projection.weight": (arch.unet.context_dim, arch.image_encoder.embed_dim + 4),
          "cc_projection.bias": (arch.unet.context_dim,)}
    state: dict[str, Any] = {k: TensorSpec(v) for k, v in unet.items()}
    state |= {"model_ema." + k.removeprefix("model.").replace(".", ""): TensorSpec(v) for k, v in unet.items()}
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(105000, dtype=torch.int32)
    state |= {f"first_stage_model.{k}": TensorSpec(v) for k, v in ldm_vae_shapes(arch.vae).items()}
    clip = openai_clip_shapes(arch.image_encoder, text_width, text_layers, vocab)
    state |= {f"cond_stage_model.model.{k}": TensorSpec(v, torch.float16) for k, v in clip.items()}
    state |= {k: TensorSpec(v) for k, v in cc.items()}
    betas = torch.linspace(arch.beta_start**0.5, arch.beta_end**0.5, arch.num_train_timesteps, dtype=torch.float64)
    state["betas"] = (betas**2).float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas**2, 0).float()
    trained = [*unet.values(), *cc.values()]
    adam = {i: {"step": torch.tensor(105000.0), "exp_avg": TensorSpec(shape), "exp_avg_sq": TensorSpec(shape)}
            for i, shape in enumerate(trained)}
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
               "params": list(range(len(trained)))}]
    return {"epoch": 3, "global_step": 105000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "optimizer_states": [{"state": adam, "param_groups": groups}], "lr_schedulers": []}


def tiny_architecture() -> Zero123Architecture:
    """A Zero123 small enough for a test (the converter's tests use the same sizes)."""
    return Zero123Architecture(
        unet=LdmUNetConfig(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(1,), num_heads=2, context_dim=16),
        vae=LdmVaeConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4),
        image_encoder=OpenAIClipVisionConfig(image_resolution=8, patch_size=4, width=32, layers=2, heads=2,
                                             embed_dim=20))


# ---------------------------------------------------------------------------------------------------------------------
# The other weight files


def _spec_state(model: torch.nn.Module) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def write_sam(path: Path, fill: RandomFill, tiny: bool) -> int:
    """``sam_vit_h_4b8939.pth``: a plain state dict of SAM ViT-H (built on the meta device: shapes only)."""
    registry = import_segment_anything().sam_model_registry
    with torch.device("meta"):
        model = _tiny_sam() if tiny else registry["vit_h"](checkpoint=None)
    return StreamingCheckpointWriter(path, fill).write(_spec_state(model))


def _tiny_sam() -> torch.nn.Module:
    """SAM with a 64-px, 2-block ViT (one windowed, one global attention block)."""
    modeling = import_segment_anything().modeling
    dim = 16
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                               out_chans=dim, use_rel_pos=True, window_size=2,
                                               global_attn_indexes=(1,)),
        prompt_encoder=modeling.PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                              mask_in_chans=4),
        mask_decoder=modeling.MaskDecoder(
            transformer_dim=dim, transformer=modeling.TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32,
                                                                        num_heads=2),
            num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16))


def write_loftr(path: Path, fill: RandomFill) -> int:
    """``indoor_ds_new.ckpt``: a Lightning checkpoint with LoFTR under ``state_dict``, keys prefixed ``matcher.``."""
    from kornia.feature import LoFTR

    from server.stages.elevation.matchers import loftr_config

    with torch.device("meta"):
        model = LoFTR(pretrained=None, config=loftr_config())
    state = {f"matcher.{k}": v for k, v in _spec_state(model).items()}
    return StreamingCheckpointWriter(path, fill).write({"epoch": 29, "global_step": 0, "state_dict": state})


def write_reconstruction(path: Path, fill: RandomFill) -> int:
    """``ckpt_215000.pth``: the four networks' state dicts at the top level, plus ``iter_step``."""
    from server.stages.reconstruction.checkpoint import OFFICIAL_NETWORKS
    from server.stages.reconstruction.model import build_model

    with torch.device("meta"):
        model = build_model("paper", seed=0)
    nets: dict[str, Any] = {name: {} for name in OFFICIAL_NETWORKS}
    for key, spec in _spec_state(model).items():
        net, _, rest = key.partition(".")
        nets[net][rest] = spec
    return StreamingCheckpointWriter(path, fill).write({**nets, "iter_step": 215000, "val_step": 0})


# ---------------------------------------------------------------------------------------------------------------------
# The run


def _drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages (a cold read, as after a download on a busy machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _photo(size: int = 512) -> np.ndarray:
    """[size, size, 3] uint8: a shaded red ball on a plain light-grey background (what SAM's box prompt needs)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    inside = (x - 0.5) ** 2 + (y - 0.52) ** 2 < 0.3**2
    shade = np.clip(1.2 - 1.5 * np.hypot(x - 0.42, y - 0.42), 0.3, 1.0)
    image = np.full((size, size, 3), 235, np.uint8)
    image[inside] = (np.stack([200 * shade, 40 * shade, 30 * shade], -1)[inside]).astype(np.uint8)
    return image


class _NonEmptyMask:
    """SAM as loaded (its time and memory are what is measured), but random weights segment at random: an empty mask
    is replaced by the prompt box so that the run goes on to the diffusion steps."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter, self.model = segmenter, segmenter.model

    def __call__(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        mask = self.segmenter(rgb, box)
        if not mask.any():
            x0, y0, x1, y1 = box
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        return mask


def run(directory: Path, *, tiny: bool = False, keep: bool = False, steps: int = 2,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Write, convert, load and start generating in ``directory`` (a fresh folder is made inside it); returns the
    JSON-ready result. With ``tiny`` the layout is small and the pipeline is not loaded (no paper-sized models).

    An exception in a phase ends the run with ``"error"`` in the result (the phases measured so far are kept).

    Raises:
        OSError: not enough free disk for the full-size run (``FULL_DISK_BYTES`` + 1 GB), or no ``/proc``.
    """
    from server.common.weights import weight_file
    from server.stages.multiview.convert import ensure_converted

    directory.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(directory).free
    needed = 10**8 if tiny else FULL_DISK_BYTES + 10**9
    if free_disk < needed:
        raise OSError(f"{directory} has {free_disk / 1e9:.1f} GB free; the first-use benchmark needs "
                      f"{needed / 1e9:.1f} GB; pass --dir on a larger disk")
    work = Path(tempfile.mkdtemp(prefix="one2345-first-use-", dir=directory))
    result: dict[str, Any] = {"mode": "tiny" if tiny else "full", "cpus": os.cpu_count(),
                              "mem_available_gib": round(available_memory() / GIB, 1),
                              "disk_free_gb": round(free_disk / 1e9, 1), "torch": torch.__version__}
    measure = Measurement()
    try:
        arch = tiny_architecture() if tiny else ZERO123_XL
        checkpoint = work / weight_file("zero123-xl").local_name
        fill = RandomFill(pool_bytes=2**20 if tiny else 128 * 2**20)
        log(f"writing the synthetic weights in {work} …")
        with measure.phase("write", work):
            layout = zero123_checkpoint(arch, **({"text_width": 16, "text_layers": 1, "vocab": 50} if tiny else {}))
            size = StreamingCheckpointWriter(checkpoint, fill, None if tiny else ZERO123_XL_BYTES).write(layout)
            sizes = {"zero123-xl": size,
                     "sam": write_sam(work / weight_file("sam").local_name, fill, tiny)}
            if not tiny:
                sizes["loftr"] = write_loftr(work / weight_file("loftr").local_name, fill)
                sizes["reconstruction"] = write_reconstruction(work / weight_file("reconstruction").local_name, fill)
            del layout
        result["file_bytes"] = sizes
        _drop_from_page_cache(checkpoint)

        log("converting …")
        events: list[str] = []

        def on_progress(event: Any) -> None:
            if event.phase != "write":  # many byte-count reports per part
                events.append(event.phase)
                log(f"  convert: {event.phase} {event.step}/{event.total}")

        started = time.perf_counter()
        with measure.phase("convert", work):
            converted = ensure_converted(checkpoint, work / "converted", architecture=arch, progress=on_progress)
        result["convert_progress"] = events
        result["converted_bytes"] = sum(p.stat().st_size for p in converted.rglob("*") if p.is_file())
        if tiny:
            from server.stages.preprocess import SamSegmenter

            with measure.phase("load", work):
                segmenter = SamSegmenter.from_checkpoint(work / weight_file("sam").local_name, build=_tiny_sam)
            with measure.phase("generate", work):
                mask = segmenter(_photo(64), (16, 16, 47, 47))
            result["mask_pixels"] = int(mask.sum())
        else:
            from server.pipeline import GenerateOptions, One2345Pipeline

            log("loading the paper preset on the CPU …")
            with measure.phase("load", work):
                pipe = One2345Pipeline.from_preset("paper", device="cpu", weights_dir=work, download_missing=False)
            result["ready_s"] = round(time.perf_counter() - started, 1)
            if pipe.models.segmenter is not None:
                pipe.models.segmenter = _NonEmptyMask(pipe.models.segmenter)
            log(f"generating up to stage 1's DDIM step {steps} …")
            seen: list[tuple[str, int]] = []

            def progress(p: Any) -> None:
                seen.append((p.stage, p.step))
                log(f"  {p.stage} {p.step}/{p.total}")

            def should_cancel() -> bool:
                return any(stage == "stage1" and step >= steps for stage, step in seen)

            from server.common.errors import CancelledError

            with measure.phase("generate", work):
                try:
                    pipe(_photo(), work / "run", GenerateOptions(), progress=progress, should_cancel=should_cancel)
                except CancelledError:
                    pass
                else:
                    raise RuntimeError("the run was expected to be cancelled after stage 1's DDIM steps")
            result["models"] = pipe.models.descriptions
            del pipe
    except Exception as error:  # the phases measured so far still come out, with what went wrong
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        result["phases"] = {k: dataclasses.asdict(v) for k, v in measure.phases.items()}
        result["disk_peak_gb"] = round(sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) / 1e9, 2)
        if keep:
            result["kept"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.benchmarks.first_use", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to write the synthetic weights (a new folder inside; default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files written (default: delete them)")
    parser.add_argument("--tiny", action="store_true", help="a tiny layout in seconds (for tests), not a measurement")
    parser.add_argument("--steps", type=int, default=2, help="stage-1 DDIM steps to run before cancelling (default 2)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    result = run(args.dir, tiny=args.tiny, keep=args.keep, steps=args.steps)
    print(json.dumps(result), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
