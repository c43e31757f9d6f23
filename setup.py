"""The package list, which pyproject.toml cannot compute (its metadata is there).

Every folder of the project installs under one namespace, `ltrainer` (a package with no folder
of its own): trainer/ is ltrainer.trainer, data_pipelines/ ltrainer.data_pipelines, configspec/
ltrainer.configspec, launchers/ ltrainer.launchers, tools/ ltrainer.tools. So site-packages
gets no generic top-level name (`trainer` is also a PyPI project; `tools` and `launchers` would
shadow or be shadowed by any other project's), the folders stay where they are in the
repository, and each file has exactly one module name. Every subpackage is found, so a new one
needs no line here. tests/test_packaging.py checks the wheel.

One optional C extension, data_pipelines/jpeg_window.c (libjpeg-turbo's partial decoding for
the torchvision backend's train crops): built when gcc, Python's and libjpeg-turbo's headers
are there (tools/setup_env.sh installs them on Debian); without it the backend decodes whole
files with OpenCV or PIL (the same pixels, slower)."""
from setuptools import Extension, find_packages, setup

FOLDERS = ("trainer", "data_pipelines", "configspec", "launchers", "tools")
PACKAGE_DIR = {f"ltrainer.{folder}": folder for folder in FOLDERS}

setup(packages=[f"ltrainer.{folder}" + (f".{sub}" if sub else "")
                for folder in FOLDERS
                for sub in ["", *find_packages(folder)]],
      package_dir=PACKAGE_DIR,
      ext_modules=[Extension("ltrainer.data_pipelines.jpeg_window",
                             ["data_pipelines/jpeg_window.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], optional=True)])
