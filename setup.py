"""The package list, which pyproject.toml cannot compute (its metadata is there).

Every folder of the project installs under one namespace, `ltrainer` (a package with no folder
of its own): trainer/ is ltrainer.trainer, data_pipelines/ ltrainer.data_pipelines, configspec/
ltrainer.configspec, launchers/ ltrainer.launchers, tools/ ltrainer.tools. So site-packages
gets no generic top-level name (`trainer` is also a PyPI project; `tools` and `launchers` would
shadow or be shadowed by any other project's), the folders stay where they are in the
repository, and each file has exactly one module name. Every subpackage is found, so a new one
needs no line here. tests/test_packaging.py checks the wheel."""
from setuptools import find_packages, setup

FOLDERS = ("trainer", "data_pipelines", "configspec", "launchers", "tools")
PACKAGE_DIR = {f"ltrainer.{folder}": folder for folder in FOLDERS}

setup(packages=[f"ltrainer.{folder}" + (f".{sub}" if sub else "")
                for folder in FOLDERS
                for sub in ["", *find_packages(folder)]],
      package_dir=PACKAGE_DIR)
