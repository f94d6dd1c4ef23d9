"""Benchmarks: scripts that print stage times and peak memory (performance goals are checked here, not in tests).

Run them as modules, e.g. ``python -m server.benchmarks.reconstruct --preset paper --device cuda``.

May import every layer of :mod:`server`; nothing imports it.
"""
