"""Multi-stage runs: one YAML lists stages (e.g. MoCo pre-training -> CE -> cRT); each stage is
an ordinary config (the file's sections, with the stage's own sections merged on top), runs in
its own sub-folder and is resumable. A stage reads an earlier stage's weights through
`model.init: "@stage_name"`.

A config without `stages` is a one-stage plan, so launchers handle both the same way.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

from .config import (Config, ConfigError, _load_file, _merge, check_consistency, check_required,
                     parse_override, resolve, schema)
from .pseudo_labels import FILE as PSEUDO_LABELS


@dataclass
class Stage:
    name: str
    cfg: Config
    run_dir: str


def _set(data: dict, dotted: str, value):
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_plan(path: str, overrides: list[str] = ()) -> list[Stage]:
    """Resolve every stage of a config file into a validated Config and a run folder.

    Overrides `section.key=value` apply to every stage; `stage.section.key=value` to one.
    """
    origins: dict[str, str] = {}
    data = _load_file(path, origins)
    stages = data.pop("stages", None)
    parsed = [parse_override(o) for o in overrides]
    if stages is None:  # a plain config: one stage named after the run
        for key, value in parsed:
            _set(data, key, value)
            origins[key] = "command line"
        cfg = _finish(data, origins)
        return [Stage(cfg.run.name, cfg, os.path.join(cfg.run.out_dir, cfg.run.name))]

    where = origins.get("stages", path)
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list of stage mappings")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    for i, (stage, name) in enumerate(zip(stages, names)):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: stages[{i}] needs a 'name'")
        if names.count(name) > 1:
            raise ConfigError(f"{where}: stage name '{name}' is used twice")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"{where}: stage name '{name}' must be a plain folder name")
        if name in schema().sections:
            raise ConfigError(f"{where}: stage name '{name}' is also a config section; "
                              f"choose another (overrides like {name}.key=... would be ambiguous)")

    plan, base_name = [], data.get("run", {}).get("name", os.path.splitext(os.path.basename(path))[0])
    for key, value in parsed:  # `run.name=...` on the command line renames the whole pipeline
        if key == "run.name":
            base_name = str(value)
    for i, (stage, name) in enumerate(zip(stages, names)):
        sdata, sorigins = copy.deepcopy(data), dict(origins)
        body = {k: v for k, v in stage.items() if k != "name"}
        _merge(sdata, body, f"{where} (stage '{name}')", sorigins)
        for key, value in parsed:
            if key.split(".", 1)[0] == name:
                key = key.split(".", 1)[1]
            elif key.split(".", 1)[0] in names:
                continue
            _set(sdata, key, value)
            sorigins[key] = "command line"
        sdata.setdefault("run", {})["name"] = f"{base_name}/{name}"
        try:
            cfg = _finish(sdata, sorigins)
        except ConfigError as e:
            raise ConfigError(f"stage '{name}': {e}") from None
        run_dir = os.path.join(cfg.run.out_dir, base_name, name)
        plan.append(Stage(name, cfg, run_dir))
    _resolve_references(plan, where)
    return plan


def _finish(data: dict, origins: dict) -> Config:
    cfg = resolve(data, origins)
    check_required(cfg, origins)
    check_consistency(cfg, origins)
    return cfg


# Keys that may name an earlier stage as '@name', and the file of that stage they mean.
REFERENCES = (("model", "init", "model_final.pt"), ("semi", "pseudo_labels", PSEUDO_LABELS))


def _resolve_references(plan: list[Stage], where: str):
    """'@name' in model.init -> that earlier stage's final weights; in semi.pseudo_labels ->
    the pseudo-labels that stage wrote."""
    done = {}
    for stage in plan:
        for section, key, file in REFERENCES:
            value = stage.cfg[section][key]
            if not (isinstance(value, str) and value.startswith("@")):
                continue
            ref = value[1:]
            if ref not in done:
                later = any(s.name == ref for s in plan)
                raise ConfigError(f"{where} (stage '{stage.name}'): {section}.{key} = '{value}' "
                                  f"must name an {'earlier' if later else 'existing'} stage "
                                  f"(earlier stages: {', '.join(done) or 'none'})")
            stage.cfg[section][key] = os.path.join(done[ref], file)
        done[stage.name] = stage.run_dir


def check_world(plan: list[Stage], world: int, how: str):
    """What a run would only find out once its processes start: every stage must split its
    batches over `world` ranks (`how` says where that number came from, for the message)."""
    from .methods import METHODS
    for stage in plan:
        for problem in METHODS[stage.cfg.method.name].check_world(stage.cfg, world):
            raise ConfigError(f"stage '{stage.name}': {problem} ({how})")


def describe_plan(plan: list[Stage]) -> str:
    """A table of what a run will do, for --dry-run."""
    rows = [("stage", "method", "model", "loss / rule", "epochs", "init", "run folder")]
    for s in plan:
        c = s.cfg
        rows.append((s.name, c.method.name, f"{c.model.name} ({c.model.head})",
                     f"{c.loss.name} / {c.train_rule.name}", str(c.sched.epochs),
                     c.model.init or "-", s.run_dir))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


def run_plan(plan: list[Stage]) -> dict:
    """Run the stages in order in this process (every rank runs this); finished stages are
    skipped by the engine itself, so re-running continues where the run stopped."""
    from .distributed import env_ranks
    from .engine import train
    from .run_folder import RunFolderError
    from .run_log import PlanPosition
    results = {}
    for i, stage in enumerate(plan):
        later = tuple((s.cfg.sched.epochs, s.cfg.engine.max_steps) for s in plan[i + 1:])
        position = PlanPosition(i + 1, len(plan), stage.name, later) if len(plan) > 1 else None
        try:
            results[stage.name] = train(stage.cfg, stage.run_dir, position)
        except RunFolderError as e:
            if len(plan) == 1:
                raise
            raise RunFolderError(f"stage '{stage.name}': {e}") from None
    if len(plan) > 1 and env_ranks()[0] == 0:
        print(where_results(plan), flush=True)
    return results


def where_results(plan: list[Stage]) -> str:
    """The pipeline's last words: each stage's results, per-class arrays and figure."""
    from .results import PER_CLASS
    lines = [f"pipeline done ({len(plan)} stages); per stage: results.json, {PER_CLASS}, "
             f"per_class_accuracy.png in"]
    lines += [f"  {s.name}: {s.run_dir}" for s in plan]
    return "\n".join(lines)
