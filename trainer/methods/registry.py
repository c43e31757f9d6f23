"""The method registry, in a module of its own: each method file registers itself here and
trainer/methods/__init__.py imports every method file, so the package and its members never
import each other (tests/test_import_cycles.py)."""
from __future__ import annotations

from ltrainer.configspec import Registry

METHODS = Registry("method.name", default="supervised", help="training method")


def register(cls):
    """Class decorator: the method under its `name`, with the config its class declares."""
    return METHODS.register()(cls)
