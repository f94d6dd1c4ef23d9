"""The ``one2345 weights`` subcommands: list, download, verify, import, prepare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.common.errors import BadInputError
from server.common.fsutil import check_folder_path
from server.service.cli.common import EXIT_FAILED, check_path


def cmd_weights_verify(args: argparse.Namespace) -> int:
    if args.all == (args.file is not None):
        raise BadInputError("give either a checkpoint FILE or --all (every weight file of the weights folder)")
    if args.all:
        return _weights_verify_all(args)
    if args.dir is not None:
        raise BadInputError("--dir goes with --all; a FILE is checked where it is")
    check_path(args.file, "checkpoint", folder=False)  # a FIFO is refused unopened (it would hang the read)
    from server.stages.reconstruction.checkpoint import verify_checkpoint

    result = verify_checkpoint(args.file)
    if result.ok:
        print(f"OK: {result.path} is a {result.kind}: {result.details}")
        return 0
    if result.report is None:  # not a checkpoint at all: bad input (2), unlike a checkpoint with wrong keys (1)
        raise BadInputError(f"{result.path} is not a reconstruction checkpoint: {result.details}")
    print(f"FAILED: {result.path} ({result.kind}):\n{result.details}", file=sys.stderr)
    return EXIT_FAILED


def _weights_verify_all(args: argparse.Namespace) -> int:
    """``one2345 weights verify --all``: hash every present weight file (digests cached by size and mtime) and say
    which are damaged; exit 1 if any is."""
    from tqdm import tqdm

    from server.common.weights import default_weights_dir, download_command, verify_all

    bars: dict[str, tqdm] = {}

    def on_hash(name: str, done: int, total: int) -> None:
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=total, desc=f"verifying {name}", unit="B",
                                                           unit_scale=True, file=sys.stderr, leave=False))
        bar.update(done - bar.n)

    try:
        states = verify_all(args.dir, on_hash=on_hash)
    finally:
        for bar in bars.values():
            bar.close()
    for s in states:
        print(f"{s.name:<15} {'damaged' if s.state == 'corrupt' else s.state:<8} {s.checksum or '-':<12} {s.filename}")
        if s.problem:
            print(f"{'':<15} {s.problem}")
    damaged = [s.name for s in states if s.state == "corrupt"]
    folder = args.dir if args.dir is not None else default_weights_dir()
    if damaged:
        print(f"one2345 weights verify: {len(damaged)} damaged file(s) in {folder}: {', '.join(damaged)}\n"
              f"  fix: run `{download_command(damaged, args.dir)}` (the damaged file stays until the new one is whole)",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    """``one2345 weights import PATH``: take the weight files of a One-2-3-45 checkout (or a folder of them)."""
    from tqdm import tqdm

    from server.common.weights import import_weights

    if args.dir is not None:
        check_folder_path(args.dir, "--dir")
    bar: list[tqdm] = []

    def on_progress(p) -> None:
        if p.phase == "done":
            if bar:
                bar.pop().close()
            return
        if not bar or bar[0].desc != f"{p.phase} {p.file}":
            if bar:
                bar.pop().close()
            bar.append(tqdm(total=p.file_total, desc=f"{p.phase} {p.file}", unit="B", unit_scale=True,
                            file=sys.stderr, leave=False))
        bar[0].update((p.hashed or p.file_done) - bar[0].n)

    try:
        results = import_weights(args.path, args.dir, on_progress=on_progress)
    finally:
        for b in bar:
            b.close()
    for r in results:
        how = f" ({r.how})" if r.how else ""
        print(f"{r.name:<15} {r.outcome}{how}" + (f": {r.source}" if r.source else "")
              + (f" — {r.detail}" if r.detail else ""))
    return EXIT_FAILED if any(r.outcome == "damaged" for r in results) else 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    from server.common.weights import download

    if args.dir is not None:
        check_folder_path(args.dir, "--dir")
    if args.offline:
        return _report_offline(args)
    paths = download(args.only or None, args.dir, offline=False)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_weights_prepare(args: argparse.Namespace) -> int:
    """``one2345 weights prepare``: the one-time Zero123-XL conversion now, ahead of the first Generate, with a
    progress line per step. SIGTERM (see :func:`main`) and Ctrl+C stop it; the conversion removes what it had
    written on the way out."""
    from server.pipeline.loading import progress_lines
    from server.pipeline.models import prepare_weights

    if args.weights_dir is not None:
        check_folder_path(args.weights_dir, "--weights-dir")
    folder = prepare_weights(args.weights_dir, progress=progress_lines(lambda line: print(line, file=sys.stderr,
                                                                                          flush=True)))
    print(f"Zero123-XL is converted and checked: {folder}", file=sys.stderr)
    print(folder)
    return 0


def _report_offline(args: argparse.Namespace) -> int:
    """``weights download --offline``: what is present and what is missing, with the one command that fetches the
    missing files; exit 1 if any is missing."""
    import shlex

    from server.common.weights import default_weights_dir, inspect_weights

    names = set(args.only or ())
    folder = Path(args.dir) if args.dir is not None else default_weights_dir()
    states = [s for s in inspect_weights(args.dir) if not names or s.name in names]
    for s in states:
        print(f"{s.name}: {folder / s.filename if s.state == 'present' else s.state}")
    missing = [s.name for s in states if s.state != "present"]
    if not missing:
        return 0
    command = "one2345 weights download" + "".join(f" --only {n}" for n in missing if names) + (
        f" --dir {shlex.quote(str(args.dir))}" if args.dir is not None else "")
    print(f"one2345 weights download: {len(missing)} weight file(s) missing or incomplete in {folder}: "
          f"{', '.join(missing)} (--offline: nothing was fetched)\n  fix: run `{command}` with network access",
          file=sys.stderr)
    return EXIT_FAILED


def cmd_weights_list(args: argparse.Namespace) -> int:
    """``one2345 weights list``: every weight file's state (what the server's GET /v1/weights lists)."""
    import json

    from server.common.weights import (
        default_weights_dir,
        disk_needed_bytes,
        human_size,
        inspect_weights,
        missing_bytes,
    )

    states = inspect_weights(args.dir, verify=args.verify)
    if args.json:
        print(json.dumps([s.to_json() for s in states], indent=2))
        return 0
    for s in states:
        size = f"{human_size(s.bytes_on_disk)} / {'' if s.size_exact else '~'}{human_size(s.expected_bytes)}"
        print(f"{s.name:<15} {s.state:<8} {size:<20} {s.checksum or '-':<12} "
              f"{'required' if s.required else 'optional':<9} {s.filename}")
        if s.problem:
            print(f"{'':<15} {s.problem}")
    left = missing_bytes(states)
    folder = args.dir if args.dir is not None else default_weights_dir()
    print(f"weights folder: {folder}; " + (f"~{human_size(left)} still to download, "
                                           f"~{human_size(disk_needed_bytes(states))} of disk with the one-time "
                                           "conversion (one2345 weights download)"
                                           if left else "every file is present"))
    return 0
