"""Drawing: the sidebar panels (``panels``), the add-on preferences class with its Weights box (``preferences``),
the History list (``history``) and the image previews they share (``previews``).

Imports ``core``, ``ops`` and ``ui`` modules (and ``bpy``); nothing imports ``ui`` except the add-on's
``register``.
"""
