"""Every way to load and save the reconstruction network — one function per format, strict about keys and shapes.

Two formats:

- **Official** ``ckpt_215000.pth`` (spec §5.9): a pickled dict with one state dict per network
  (``pyramid_feature_network``, ``sdf_network_lod0``, ``variance_network_lod0``, ``rendering_network_lod0``) plus
  ``optimizer``, ``iter_step`` and ``val_step``. Read with ``weights_only=True``: no code from the file runs.
- **Ours**: a folder with ``config.json`` (format marker + :class:`ReconstructionConfig`) and ``model.safetensors``
  (the flat state dict). Training writes it; the server loads it unchanged.

Loading is strict: a missing, unexpected or mis-shaped key is an error listing all of them. The one tolerated gap is
``num_batches_tracked``, which older InPlaceABN releases did not store and which no forward pass reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.common.errors import BadInputError, CheckpointError, MissingWeightsError
from server.common.fsutil import make_temp_dir, replace_dir
from server.stages.reconstruction.model import PRESETS, ReconstructionConfig, ReconstructionModel

OFFICIAL_NETWORKS = ("pyramid_feature_network", "sdf_network_lod0", "variance_network_lod0", "rendering_network_lod0")
OFFICIAL_BOOKKEEPING = ("optimizer", "iter_step", "val_step")
FORMAT_NAME = "one2345-reconstruction"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class KeyReport:
    """How a state dict differs from a model's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """(key, shape in the file, shape the model expects)."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"{len(items)} {title} keys: " + ", ".join(items[:limit]) +
                             (f", … ({len(items) - limit} more)" if len(items) > limit else ""))
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} mis-shaped keys: " + ", ".join(
                f"{k} (file {list(a)}, expected {list(b)})" for k, a, b in self.mismatched[:limit]))
        return "\n".join(lines)


def compare_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> KeyReport:
    """Compare ``state`` against ``model.state_dict()`` (tolerating absent ``num_batches_tracked``)."""
    expected = model.state_dict()
    report = KeyReport()
    for key, value in expected.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
        elif not isinstance(state[key], torch.Tensor):
            report.mismatched.append((key, (), tuple(value.shape)))
        elif tuple(state[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(value.shape)))
    report.unexpected = [k for k in state if k not in expected]
    return report


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` or raise CheckpointError listing every problem."""
    report = compare_state_dict(model, state)
    if not report.ok:
        raise CheckpointError(f"{source} does not match the reconstruction network:\n{report.describe()}",
                              fix="check that the file is the One-2-3-45 reconstruction checkpoint (ckpt_215000.pth) "
                                  "or a folder written by one2345-train")
    model.load_state_dict(state, strict=False)  # strictness was checked above, with the num_batches_tracked allowance


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch.load on damaged bytes fails in whatever its unpickler or zip reader trips over first (IndexError,
        # KeyError, UnicodeDecodeError, … as well as UnpicklingError and BadZipFile): every one means "not readable".
        text = str(e)
        if "weights_only" in text or "Weights only" in text:
            # torch's advice here is to load with weights_only=False, i.e. to run the file's code: never ours to give.
            why = "it is a pickle of other Python objects than tensors, which is never unpickled here"
        else:
            why = f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint ({why}); the file is truncated, corrupt "
                              "or not a checkpoint",
                              fix="download it again: one2345 weights download --only reconstruction") from None


def official_state(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read an official checkpoint: (state dict per network, bookkeeping such as ``iter_step``)."""
    data = _torch_load(path)
    if not isinstance(data, dict) or not all(k in data for k in OFFICIAL_NETWORKS):
        found = sorted(map(repr, data))[:12] if isinstance(data, dict) else type(data).__name__
        hint = ""
        if isinstance(data, dict) and "state_dict" in data:
            hint = " It looks like a PyTorch Lightning checkpoint (Zero123 or LoFTR), not the reconstruction network."
        raise CheckpointError(f"{path} is not a One-2-3-45 reconstruction checkpoint: it needs the top-level keys "
                              f"{list(OFFICIAL_NETWORKS)}, found {found}.{hint}")
    for name in OFFICIAL_NETWORKS:
        state = data[name]
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise CheckpointError(f"{path}: entry {name!r} is not a state dict (a mapping of parameter names to "
                                  f"tensors) but a {type(state).__name__}")
    nets = {name: data[name] for name in OFFICIAL_NETWORKS}
    extra = {k: v for k, v in data.items() if k not in OFFICIAL_NETWORKS}
    return nets, extra


def flatten_official(nets: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One flat state dict with ``<network>.<key>`` names, the model's own naming."""
    return {f"{net}.{key}": value for net, state in nets.items() for key, value in state.items()}


def load_official(path: str | Path) -> ReconstructionModel:
    """Load ``ckpt_215000.pth`` (paper architecture) strictly."""
    path = _existing(path)
    nets, _ = official_state(path)
    model = ReconstructionModel(PRESETS["paper"])
    load_state_strict(model, flatten_official(nets), str(path))
    return model


def save_checkpoint(model: ReconstructionModel, folder: str | Path, extra: dict | None = None) -> Path:
    """Write our format (``config.json`` + ``model.safetensors``) atomically; returns the folder."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, f".{folder.name}.")  # 0777 less the umask (mkdtemp's 0700 would stay)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict(), **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    (tmp / WEIGHTS_FILE).write_bytes(save(state))  # save_file would make it 0600; this is 0666 less the umask
    return replace_dir(tmp, folder)


def read_config(folder: Path) -> tuple[ReconstructionConfig, dict]:
    """The config and metadata of a checkpoint folder."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; a reconstruction checkpoint folder holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{config_path} is not valid UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not a {FORMAT_NAME} config (format = "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version", 0)
    if type(version) is not int or version < 0:
        raise CheckpointError(f"{config_path} has format_version {version!r}; it must be an integer (this version "
                              f"writes {FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version {version}; this version reads up to "
                              f"{FORMAT_VERSION}", fix="upgrade one2345")
    if "config" not in meta:
        raise CheckpointError(f"{config_path} has no \"config\" entry (the network's architecture)")
    try:
        return ReconstructionConfig.from_dict(meta["config"]), meta
    except BadInputError as e:
        raise CheckpointError(f"{config_path}: {e.message}") from None


def load_checkpoint(folder: str | Path) -> ReconstructionModel:
    """Load our format strictly."""
    folder = _existing(folder)
    config, _, state = _folder_state(folder)
    model = ReconstructionModel(config)
    load_state_strict(model, state, str(folder / WEIGHTS_FILE))
    return model


def _folder_state(folder: Path) -> tuple[ReconstructionConfig, dict, dict[str, torch.Tensor]]:
    """Our format's config, metadata and flat state dict, read but not yet compared with the network."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config, meta = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE} (or it is not a regular file)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights}: {str(e)[:200]} (truncated or corrupt)") from None
    return config, meta, state


def load_reconstruction_model(path: str | Path) -> ReconstructionModel:
    """The one entry point: a folder is our format, a file is the official layout."""
    path = _existing(path)
    return load_checkpoint(path) if path.is_dir() else load_official(path)


@dataclass
class VerifyResult:
    """What ``one2345 weights verify`` says about a file."""

    path: Path
    kind: str
    ok: bool
    details: str
    report: KeyReport | None = None


def verify_checkpoint(path: str | Path) -> VerifyResult:
    """Identify a reconstruction checkpoint and check it strictly against its network. Never raises CheckpointError:
    problems come back in the result."""
    path = Path(path).expanduser()
    try:
        path = _existing(path)  # a FIFO or device comes back as "unrecognised", unopened
        if path.is_dir():
            config, meta, state = _folder_state(path)
            model = ReconstructionModel(config)
            report = compare_state_dict(model, state)
            if not report.ok:  # a checkpoint, with wrong keys: exit 1 in the CLI, unlike a file that is none (2)
                return VerifyResult(path, "one2345 reconstruction checkpoint (folder)", False,
                                    report.describe(limit=1000), report)
            params = sum(p.numel() for p in model.parameters())
            preset = next((n for n, c in PRESETS.items() if c == config), "custom")
            step = f", step {meta['step']}" if "step" in meta else ""
            return VerifyResult(path, "one2345 reconstruction checkpoint (folder)", True,
                                f"architecture {preset}{step}, {params:,} parameters")
        nets, extra = official_state(path)
        model = ReconstructionModel(PRESETS["paper"])
        report = compare_state_dict(model, flatten_official(nets))
        kind = "One-2-3-45 reconstruction checkpoint (official layout)"
        if not report.ok:
            return VerifyResult(path, kind, False, report.describe(limit=1000), report)
        params = sum(v.numel() for v in flatten_official(nets).values() if v.is_floating_point())
        ignored = sorted(set(extra) - set(OFFICIAL_BOOKKEEPING))
        note = f"; ignored extra entries {ignored}" if ignored else ""
        return VerifyResult(path, kind, True, f"iteration {extra.get('iter_step', '?')}, {params:,} parameters{note}")
    except CheckpointError as e:
        return VerifyResult(path, "unrecognised", False, e.message)


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"checkpoint {path} does not exist",
                                  fix="one2345 weights download --only reconstruction, or pass --checkpoint PATH")
    if not (path.is_file() or path.is_dir()):  # refused before it is opened: reading a FIFO would wait for ever
        raise CheckpointError(f"checkpoint {path} is not a regular file or a folder (a FIFO, socket or device); a "
                              "checkpoint is a .pth file or a folder written by one2345-train")
    return path
