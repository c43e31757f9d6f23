"""The loss registry, in a module of its own: each loss file registers itself here and
trainer/losses/__init__.py imports every loss file, so the package and its members never
import each other (tests/test_import_cycles.py)."""
from __future__ import annotations

from ltrainer.configspec import Registry

LOSSES = Registry("loss.name", default="ce", help="training loss")
