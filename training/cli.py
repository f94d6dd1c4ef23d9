"""``one2345-train``: the training command line (``render`` now; ``fit``, ``evaluate``, ``predict`` join later).

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``: it registers the subcommand's
options and sets ``handler`` (``args → exit status``) with ``set_defaults``. Adding a subcommand means appending its
``add_parser`` to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from server.common.errors import One2345Error
from training import evaluate, predict, texture_command, train
from training.render import driver as render_driver

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (
    render_driver.add_parser,
    predict.add_predict_parser,
    train.add_fit_parser,
    evaluate.add_evaluate_parser,
    texture_command.add_evaluate_texture_parser,
)
"""Registration functions of the subcommands, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``one2345-train`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="one2345-train", description="Train the One-2-3-45 reconstruction network.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for unusable input, with the error's message and fix)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except One2345Error as err:
        print(f"one2345-train {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
