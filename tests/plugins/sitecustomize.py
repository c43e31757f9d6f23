"""Loaded at interpreter start when a test puts this folder on PYTHONPATH (tests/conftest.py
run_cli does so when the environment asks for a kill point): installs it in this process."""
import os

if os.environ.get("LTT_TEST_KILL") or os.environ.get("LTT_KILL_AT_STEP"):
    from tests.kill_points import from_environment

    from_environment()
