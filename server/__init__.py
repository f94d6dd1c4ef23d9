"""One-2-3-45 inference: pipeline, models, checkpoint loaders, HTTP server and the ``one2345`` command.

Heavy dependencies (torch, diffusers, …) are imported by the submodules that need them, so ``import server``
stays cheap and ``server.errors`` can be used anywhere.
"""

__version__ = "0.1.0"
