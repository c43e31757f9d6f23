"""One augmentation spec for every loader backend (issue 14 item 3).

The recipes' parameters live in data_pipelines/augment.py only; the backends import them from
there (and FlatSource from flat.py), never from loaders.py, which imports the backends on
demand: no import cycle between the registry and its backends.
"""
import ast
import os

from tests.conftest import ROOT

BACKEND_MODULES = ("dali_loader", "dali_graph", "ffcv_loader", "ffcv_beton", "ffcv_ops",
                   "torchvision_loader")
SPEC_NAMES = {"MOCO", "RRC_SCALE", "RRC_RATIO", "FLIP_P", "EVAL_RESIZE", "moco_blur_kernel"}


def _imports(module: str) -> set:
    tree = ast.parse(open(os.path.join(ROOT, "data_pipelines", module + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            found.update((0, a.name) for a in node.names)
    return found


def test_backends_never_import_the_registry():
    for module in BACKEND_MODULES:
        imports = _imports(module)
        assert (1, "loaders") not in imports and (0, "ltrainer.data_pipelines.loaders") not in imports, \
            module


def test_recipe_parameters_are_declared_once_in_augment():
    """No other data_pipelines module assigns a recipe parameter of its own."""
    folder = os.path.join(ROOT, "data_pipelines")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name == "augment.py":
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in tree.body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if isinstance(node, ast.FunctionDef):
                targets.append(node.name)
            assert not SPEC_NAMES & set(targets), (name, targets)
