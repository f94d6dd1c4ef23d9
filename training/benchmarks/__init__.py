"""Benchmarks of the training code, each printing one JSON line (``python -m training.benchmarks.fit``).

May import :mod:`training` and :mod:`server`; nothing imports it.
"""
