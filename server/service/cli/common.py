"""What every subcommand shares: exit codes, progress bars, path checks."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from server.common.errors import BadInputError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every clean-up that runs for Ctrl+C runs for it too."""


class Bars:
    """A tqdm bar on stderr for each stage that reports more than one step."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total <= 1:
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = self._tqdm(total=total, desc=stage, leave=False, file=sys.stderr,
                                                 dynamic_ncols=True, unit_scale=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def check_path(path: str | Path, what: str, folder: bool) -> Path:
    """``path`` if it exists and is a folder (``folder``) or a regular file; a FIFO or device is refused before
    anything opens it (reading one would wait for ever). Cheap: checked before torch is imported."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:
        raise BadInputError(f"{what} {path} does not exist") from None
    if folder and not stat.S_ISDIR(mode):
        raise BadInputError(f"{what} {path} is not a folder")
    if not folder and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise BadInputError(f"{what} {path} is not a regular file or a folder (a FIFO, socket or device)")
    return path
