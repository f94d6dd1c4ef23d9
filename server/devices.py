"""Device selection, shared by the CLI, the pipeline and the server."""

from __future__ import annotations

from server.errors import BadInputError


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; an unavailable ``cuda`` is a clear error."""
    import torch  # imported here so `one2345 --help` stays fast

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device {name!r} was asked for, but this PyTorch build sees no CUDA device",
                            fix="use --device cpu, or install a CUDA build of torch")
    if name != "cpu" and not name.startswith("cuda"):
        raise BadInputError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name
