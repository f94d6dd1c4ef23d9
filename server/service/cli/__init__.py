"""The ``one2345`` command.

Subcommands are thin: they parse flags, call one library function, and turn :class:`server.common.errors.One2345Error`
into a readable message and a non-zero exit code (2 for bad input, 1 otherwise). Results go to stdout (the output path
is the last line), progress and logs to stderr. Everything a command can check before the expensive part — the
inputs readable, the output path writable as a file, the options in range — it checks first, so a mistake costs
seconds, not a finished run.

Modules: :mod:`.common` (exit codes, progress bars, path checks), :mod:`.commands` (generate, imagine, reconstruct,
remesh, bake, elevation, sample-views), :mod:`.weights` (the ``weights`` subcommands) and :mod:`.main` (the parser and
:func:`main`). Like the rest of the service it may import the pipeline, stages and common ground; heavy modules are
imported inside the commands, after their inputs are checked, so a mistake is answered before torch loads.
"""

from server.service.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
