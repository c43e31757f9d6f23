"""The package list, which pyproject.toml cannot compute (its metadata is there).

The library keeps its import names: trainer, data_pipelines, configspec (every subpackage found,
so a new one needs no line here). The script folders launchers/ and tools/ stay where they are
in the repository but install as ltrainer.launchers and ltrainer.tools (`ltrainer` is a
namespace package with no folder of its own): site-packages gets no top-level `tools` or
`launchers`, and each file has exactly one module name. tests/test_packaging.py checks the
wheel."""
from setuptools import find_packages, setup

SCRIPTS = {"ltrainer.launchers": "launchers", "ltrainer.tools": "tools"}

setup(packages=find_packages(include=["configspec", "configspec.*", "trainer", "trainer.*",
                                      "data_pipelines", "data_pipelines.*"]) + list(SCRIPTS),
      package_dir=SCRIPTS)
