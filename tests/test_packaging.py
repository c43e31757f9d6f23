"""The installed project (issue 17 item 4): the wheel holds no generic top-level package
(`tools`, `launchers`), every project file has one module name, nothing edits sys.path, the
console scripts resolve, launchers call only submitit's public API, and one function spawns
local ranks."""
from __future__ import annotations

import ast
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = {"ltrainer"}
INSTALLED = {"trainer": "ltrainer/trainer", "data_pipelines": "ltrainer/data_pipelines",
             "configspec": "ltrainer/configspec",
             "launchers": "ltrainer/launchers", "tools": "ltrainer/tools"}


def project_files(*folders):
    folders = folders or (*INSTALLED, "tests")
    for folder in folders:
        yield from sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True))


def test_wheel_installs_no_generic_top_level_names(tmp_path):
    src = tmp_path / "src"   # a copy: building writes build/ and *.egg-info beside the sources
    for folder in INSTALLED:
        shutil.copytree(os.path.join(ROOT, folder), src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    wheel, = glob.glob(str(tmp_path / "ltrainer-*.whl"))
    names = [n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in names} == TOP_LEVEL
    for path in project_files(*INSTALLED):   # every file, under its one installed name
        rel = os.path.relpath(path, ROOT).split(os.sep)
        assert "/".join([INSTALLED[rel[0]], *rel[1:]]) in names, path


def test_no_sys_path_edits():
    edits = re.compile(r"sys\.path\s*(\.(insert|append|extend)|\[|=|\+=)|site\.addsitedir")
    found = [f"{os.path.relpath(p, ROOT)}:{i}" for p in project_files()
             for i, line in enumerate(open(p), 1) if edits.search(line)]
    assert not found, f"sys.path edited (the project is installed: pip install -e .): {found}"


def _imports(path):
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module


def test_scripts_folders_have_one_module_name():
    """tools/x.py is ltrainer.tools.x, trainer/x.py ltrainer.trainer.x: importing one as
    `tools.x` or `trainer.x` (which the repository root on sys.path would allow) would load a
    second copy, with its own registries."""
    found = [(os.path.relpath(p, ROOT), m) for p in project_files() for m in _imports(p)
             if m.split(".")[0] in INSTALLED]
    assert not found, f"import these as ltrainer.<folder>: {found}"


def test_only_public_submitit_api():
    found = [(os.path.relpath(p, ROOT), m) for p in project_files() for m in _imports(p)
             if m.startswith("submitit.") and m != "submitit.helpers"]
    text = [os.path.relpath(p, ROOT) for p in project_files("launchers")
            if "submitit.core" in open(p).read()]
    assert not found and not text, f"private submitit modules used: {found} {text}"


def _console_scripts():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_console_scripts(name):
    """Each entry point is a main() of a launcher or tool, and the README lists it."""
    module, _, func = _console_scripts()[name].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"`{name}`" in f.read(), f"README names no console script {name}"


def test_one_local_spawner():
    """Local ranks are started in one place, trainer.distributed.run_local (signals forwarded,
    rank 0's result returned): launchers and tools call it rather than spawn their own."""
    spawn = re.compile(r"\b(start_processes|mp\.spawn|multiprocessing\.spawn)\(")
    found = [os.path.relpath(p, ROOT) for p in project_files(*INSTALLED)
             if spawn.search(open(p).read())]
    assert found == ["trainer/distributed.py"], found


def test_scripts_run_by_path_from_the_repository_root():
    """`python tools/x.py --help` as the README types it: the installed package, no sys.path.
    The scripts that import other launchers / tools modules (the others import only the
    library, the same way)."""
    from concurrent.futures import ThreadPoolExecutor

    scripts = [os.path.relpath(p, ROOT) for p in project_files("launchers", "tools")
               if '__name__ == "__main__"' in open(p).read() and "argparse" in open(p).read()
               and "from ltrainer." in open(p).read()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(script):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        return script, proc.returncode, proc.stderr[-500:]

    with ThreadPoolExecutor(2) as pool:
        failed = [r for r in pool.map(run, scripts) if r[1] != 0]
    assert len(scripts) >= 8 and not failed, failed


def test_library_files_stay_small():
    """No file under trainer/, data_pipelines/ or launchers/ over 500 lines (issue 17): a file
    that grows past it does more than one job; split it by job."""
    long = {os.path.relpath(p, ROOT): n for p in project_files("trainer", "data_pipelines",
                                                                "launchers")
            if (n := sum(1 for _ in open(p))) > 500}
    assert not long, long
