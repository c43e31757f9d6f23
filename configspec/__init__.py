"""How a part of the code declares the config it reads: fields, registries, cross-key checks.

A loss, method, model family, data source, augmentation recipe or loader backend declares its
keys (type, range, default, help) and its own cross-key rules next to its code, and registers
itself in the registry of its kind; trainer/config.py composes the schema from those.

Why a top-level module of its own: both trainer (the YAML loader, methods, losses, models) and
data_pipelines (sources, recipes, loaders) declare config, and data_pipelines never imports
trainer. This file holds only plain Python (no torch), so it sits below both without an arrow
pointing the wrong way.

    LOSSES = Registry("loss.name", default="ce", help="training loss")

    @LOSSES.register("focal", config={"loss": {"gamma": F("float", 1.0, ge=0)}})
    class FocalLoss: ...

A class may instead carry `config` (merged along its bases, so a family's keys are inherited)
and a classmethod `check_config(cls, cfg, fail)`; checks run only for the selected name.
`fail(key, message)` stops with a ConfigError that names the file or command line which set
`key`.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and key."""


@dataclass
class Field:
    """One key: a type ('int', 'float', 'bool', 'str', 'list', 'any'), a default, optionally
    the allowed values (a tuple, or a Registry: its names), whether None is allowed, and for
    numbers (or the items of a list of numbers) a range: ge / gt / le / lt."""
    type: str
    default: Any
    choices: Any = None
    nullable: bool = False
    help: str = ""
    item_type: str | None = None  # element type of a list
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    @property
    def numeric(self) -> bool:
        return self.type in ("int", "float") or self.item_type in ("int", "float")

    @property
    def has_range(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def in_range(self, value) -> bool:
        items = value if isinstance(value, list) else [value]
        return all((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                   and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt)
                   for v in items)

    def range_text(self) -> str:
        """'be >= 1', 'be > 0', 'lie in [0, 1)', ... (after 'must')."""
        lo = (f"[{self.ge:g}" if self.ge is not None else
              f"({self.gt:g}" if self.gt is not None else None)
        hi = (f"{self.le:g}]" if self.le is not None else
              f"{self.lt:g})" if self.lt is not None else None)
        if lo and hi:
            text = f"lie in {lo}, {hi}"
        elif lo:
            text = ("be >= " if lo[0] == "[" else "be > ") + lo[1:]
        else:
            text = ("be <= " if hi[-1] == "]" else "be < ") + hi[:-1]
        return ("each " if self.type == "list" else "") + text


def F(type, default, *choices, nullable=False, help="", item=None, ge=None, gt=None, le=None,
      lt=None) -> Field:
    """Field(...) in one short line: F('float', 0.1, gt=0, help='base learning rate')."""
    if len(choices) == 1 and not isinstance(choices[0], str):
        choices = choices[0]              # a Registry (or any collection of names)
    return Field(type, default, choices or None, nullable, help, item, ge, gt, le, lt)


Check = Callable[[Any, Callable[[str, str], None]], None]


@dataclass
class Part:
    """What one component owns: fields by section, and a check run when it is selected."""
    config: dict
    check: Check | None = None
    owner: str = ""           # for messages about the declaration itself


def class_config(cls) -> dict:
    """`config` of a class merged along its bases (base first), so a family's keys are kept."""
    out: dict = {}
    for klass in reversed(getattr(cls, "__mro__", (cls,))):
        for section, fields in (vars(klass).get("config") or {}).items():
            out.setdefault(section, {}).update(fields)
    return out


class Registry(dict):
    """The components of one kind by name (a dict name -> object), chosen by one config key.

    `config` / `check` are the keys and the rule every member shares (e.g. the data root of
    every source); each member adds its own with `register` / `add`.
    """

    def __init__(self, key: str, default: str, help: str = "", config: dict | None = None,
                 check: Check | None = None):
        super().__init__()
        self.key = key
        self.section, self.name_key = key.split(".")
        self.default, self.help = default, help
        self.common = Part(config or {}, check)
        self.parts: dict[str, Part] = _FamilyParts(self)
        self.families: dict[str, Any] = {}   # prefix -> builder(rest of the name, **kw)

    def add(self, name: str, obj, config: dict | None = None, check: Check | None = None):
        if name in self:
            raise ValueError(f"{self.key}: '{name}' is registered twice")
        self[name] = obj
        self.parts[name] = Part(config or {}, check)
        return obj

    def add_family(self, prefix: str, builder, config: dict | None = None,
                   check: Check | None = None):
        """Names `prefix` + anything (e.g. 'timm/<model>'): REG[name] is builder bound to the
        rest of the name. The family's Part is listed once, as `prefix` + '<name>'."""
        self.families[prefix] = builder
        self.parts[f"{prefix}<name>"] = Part(config or {}, check)
        return builder

    def family_of(self, name) -> str | None:
        return next((p for p in self.families if isinstance(name, str)
                     and name.startswith(p) and len(name) > len(p)), None)

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or self.family_of(name) is not None

    def __missing__(self, name):
        prefix = self.family_of(name)
        if prefix is None:
            raise KeyError(name)
        return functools.partial(self.families[prefix], name[len(prefix):])

    def register(self, name: str | None = None, *, config: dict | None = None,
                 check: Check | None = None):
        """Decorator: `@REG.register("focal", config=...)`, or bare `@REG.register()` on a
        class with `name`, `config` and `check_config`."""
        def deco(obj):
            n = name or obj.name
            cfg = config if config is not None else class_config(obj)
            chk = check or getattr(obj, "check_config", None)
            return self.add(n, obj, cfg, chk)
        return deco

    def name_field(self) -> Field:
        return Field("str", self.default, self, help=self.help)


class _FamilyParts(dict):
    """A registry's Parts by name; a family member's name finds its family's Part."""

    def __init__(self, registry: Registry):
        super().__init__()
        self.registry = registry

    def __missing__(self, name):
        prefix = self.registry.family_of(name)
        if prefix is None:
            raise KeyError(name)
        return self[f"{prefix}<name>"]


# ----------------------------------------------------------------------------- composition

@dataclass
class Schema:
    """The sections of every part, and the checks to run, in the parts' order."""
    sections: dict[str, dict[str, Field]]
    parts: list

    def checks(self, cfg) -> list[Check]:
        """Checks that apply to this config: every module's, and the chosen member's."""
        out = []
        for part in self.parts:
            if isinstance(part, Registry):
                out += [part.common.check, part.parts[cfg[part.section][part.name_key]].check]
            else:
                out.append(part.check)
        return [c for c in out if c is not None]


def compose(parts: list) -> Schema:
    """Parts are Registries (their name key, shared config and every member's config) and
    Part objects of always-present keys. Two different declarations of one key are a
    programming error."""
    sections: dict[str, dict[str, Field]] = {}
    owner: dict[str, str] = {}

    def add(config: dict, who: str):
        for section, fields in config.items():
            sec = sections.setdefault(section, {})
            for key, f in fields.items():
                dotted = f"{section}.{key}"
                if sec.get(key) is f:   # the same declaration, shared (a family, a base class)
                    continue
                if dotted in owner:
                    raise AssertionError(f"{dotted} is declared by both {owner[dotted]} and {who}")
                owner[dotted] = who
                sec[key] = f

    for part in parts:
        if isinstance(part, Registry):
            add({part.section: {part.name_key: part.name_field()}}, part.key)
            add(part.common.config, part.key)
            for name, p in part.parts.items():
                add(p.config, f"{part.key} '{name}'")
        else:
            add(part.config, part.owner or repr(part.check))
    return Schema(sections, parts)


def close_match(word: str, candidates) -> str | None:
    hit = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return hit[0] if hit else None
