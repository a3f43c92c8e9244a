"""Sub-commands of the ``sharpkit`` command, one module each.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` (a callable ``args -> int`` exit code) with ``set_defaults``.
"""
