"""Configs: YAML files with `_base_` inheritance, dotted overrides, and a declared schema.

Everything a run does is decided here, before any process starts, so that a typo costs a
second and not a cluster slot. Each key remembers the file (or the command line) that set it,
so errors can point there.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from ltrainer.configspec import F, ConfigError, Field, close_match  # noqa: F401  (re-exported)

REQUIRED = "???"  # a value that a config must set (e.g. the data root of ImageNet-LT)
# `${NAME}` or `${NAME:-default}` in a string value: the environment variable NAME, so shipped
# configs can find data where each user keeps it (e.g. data.root: ${LTRAINER_DATA}/inat2018).
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def schema():
    """The composed schema (configspec.Schema): every registry's and every part's keys and
    checks. Imported on first use, since the parts import this module's helpers."""
    from .components import SCHEMA
    return SCHEMA


class Config(dict):
    """A nested dict with attribute access (cfg.optim.lr); picklable, so it can travel to
    spawned processes and Slurm jobs."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __reduce__(self):
        return (Config, (dict(self),))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _wrap(d):
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


# --------------------------------------------------------------------------- loading

def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _merge(dst: dict, src: dict, origin: str, origins: dict, prefix=""):
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, origins, dotted + ".")
        else:
            dst[key] = copy.deepcopy(value)
            origins[dotted] = origin
            if isinstance(value, dict):
                for sub in _flatten(value, dotted + "."):
                    origins[sub] = origin


def _flatten(d: dict, prefix="") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
    return out


def _load_file(path: str, origins: dict, chain=()) -> dict:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_ inheritance loops back to itself")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: _base_ = {bases!r} must be a file name or a list of file "
                          f"names")
    merged: dict = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        _merge(merged, _load_file(base_path, origins, chain + (path,)), None, {})
        # origins of the base were recorded by the recursive call; keep them
    _merge(merged, data, path, origins)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.05' -> ('optim.lr', 0.05); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' should look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | None, overrides: list[str] = (), validate: bool = True) -> Config:
    """Load a YAML config (with its bases), apply dotted overrides, fill defaults, validate."""
    origins: dict[str, str] = {}
    data = _load_file(path, origins) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}': '{p}' is not a section")
        node[parts[-1]] = value
        origins[key] = "command line"
    cfg = resolve(data, origins)
    if validate:
        check_required(cfg, origins)
        check_consistency(cfg, origins)
    return cfg


# --------------------------------------------------------------------------- validation

def _type_ok(field: Field, value) -> tuple[bool, Any]:
    if value is None:
        return field.nullable, value
    t = field.type
    if t == "any":
        return True, value
    if t == "bool":
        return isinstance(value, bool), value
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if t == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if t == "str":
        return isinstance(value, str), value
    if t == "list":
        if not isinstance(value, list):
            return False, value
        if field.item_type:
            sub = Field(field.item_type, None)
            ok_items = [_type_ok(sub, v) for v in value]
            if not all(ok for ok, _ in ok_items):
                return False, value
            return True, [v for _, v in ok_items]
        return True, value
    raise AssertionError(f"unknown schema type {t}")


def _describe(field: Field) -> str:
    kind = {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "list": "a list", "any": "any value"}[field.type]
    if field.type == "list" and field.item_type:
        kind = f"a list of {field.item_type}s"
    if field.choices:
        kind = "one of " + ", ".join(repr(c) for c in field.choices)
    if field.nullable:
        kind += " (or null)"
    return kind


def _where(origins: dict, key: str) -> str:
    return origins.get(key) or "config"


def _unknown(origins, dotted, candidates) -> ConfigError:
    close = close_match(dotted, candidates)
    if not close:  # compare the last component too: 'optim.lrr' -> 'optim.lr'
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        hit = close_match(dotted.rsplit(".", 1)[-1], by_last)
        close = by_last[hit] if hit else None
    hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"{_where(origins, dotted)}: unknown key '{dotted}'{hint}")


def _check_value(field: Field, value, dotted: str, where: str):
    """Type, allowed names (with the closest one) and range of one value; returns it typed."""
    ok, typed = _type_ok(field, value)
    if ok and typed is not None and field.choices and typed not in field.choices:
        close = close_match(typed, field.choices) if isinstance(typed, str) else None
        hint = f"; did you mean '{close}'?" if close else ""
        raise ConfigError(f"{where}: {dotted} = {value!r} is not allowed; expected "
                          f"{_describe(field)}{hint}")
    if not ok:
        raise ConfigError(f"{where}: {dotted} = {value!r} is not allowed; expected "
                          f"{_describe(field)}")
    if typed is not None and field.has_range and not field.in_range(typed):
        null = " (or null)" if field.nullable else ""
        raise ConfigError(f"{where}: {dotted} = {value!r} must {field.range_text()}{null}")
    return typed


def resolve(data: dict, origins: dict | None = None, sections=None) -> Config:
    """Check every key, type, name and range against the schema and fill in defaults."""
    origins = origins or {}
    sections = sections or schema().sections
    out, unset = {}, {}
    for section, values in data.items():
        if section not in sections:
            raise _unknown(origins, section, list(sections))
        if not isinstance(values, dict):
            raise ConfigError(f"{_where(origins, section)}: '{section}' must be a section "
                              f"(a mapping of keys), got {values!r}")
    for section, fields in sections.items():
        given = data.get(section) or {}
        sec = {}
        for key in given:
            if key not in fields:
                raise _unknown(origins, f"{section}.{key}", [f"{section}.{k}" for k in fields])
        for key, field in fields.items():
            dotted = f"{section}.{key}"
            value = given.get(key, copy.deepcopy(field.default))
            if isinstance(value, str) and "${" in value:
                value = _expand(value, dotted, unset)
            if value == REQUIRED:
                sec[key] = REQUIRED
                continue
            sec[key] = _check_value(field, value, dotted, _where(origins, dotted))
        out[section] = sec
    if unset:
        raise _unset_error(unset, origins)
    return _wrap(out)


def _expand(value: str, dotted: str, unset: dict):
    """Substitute `${NAME}` / `${NAME:-default}`; records keys whose variable is unset."""
    def sub(m):
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            unset.setdefault(name, []).append((dotted, value))
            return m.group(0)
        return default
    return ENV_VAR.sub(sub, value)


def _unset_error(unset: dict, origins: dict) -> ConfigError:
    """Every key that needs an unset environment variable, in one line."""
    parts = []
    for name, uses in unset.items():
        keys = ", ".join(f"{k} = {v!r}" for k, v in uses)
        where = _where(origins, uses[0][0])
        parts.append(f"{where}: the environment variable {name} is not set ({keys}); "
                     f"export {name}=<folder> with that layout, or set "
                     f"{' '.join(k + '=...' for k, _ in uses)} on the command line")
    return ConfigError("; ".join(parts))


def check_required(cfg: Config, origins: dict | None = None):
    """Every required key still unset, all in one message (grouped by the file that asks)."""
    by_where: dict[str, list[str]] = {}
    for section, values in cfg.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if value == REQUIRED:
                dotted = f"{section}.{key}"
                by_where.setdefault(_where(origins or {}, dotted), []).append(dotted)
    parts = []
    for where, keys in by_where.items():
        names = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        verb, it = ("is", "it") if len(keys) == 1 else ("are", "them")
        parts.append(f"{where}: {names} {verb} required; set {it} in the config or on the "
                     f"command line ({' '.join(k + '=...' for k in keys)})")
    if parts:
        raise ConfigError("; ".join(parts))


def check_consistency(cfg: Config, origins: dict | None = None):
    """The rules that tie keys together, each declared by the part of the code that owns
    them (see configspec); `fail(key, message)` prefixes the file or command line of `key`."""
    o = origins or {}

    def fail(key: str, message: str):
        raise ConfigError(f"{_where(o, key)}: {message}")

    for check in schema().checks(cfg):
        check(cfg, fail)


def save_config(cfg: Config, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
