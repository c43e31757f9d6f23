"""Shared fixtures: tiny Fashion-MNIST-LT runs that finish in seconds on 2 CPU cores."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"

needs_fmnist = pytest.mark.skipif(not os.path.exists(FMNIST),
                                  reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="session")
def small_test_list(tmp_path_factory):
    """An index list of 300 Fashion-MNIST test images (30 per class), so evaluation is quick."""
    from ltrainer.data_pipelines.sources import read_fashion_mnist
    labels = read_fashion_mnist(train=False).labels
    path = tmp_path_factory.mktemp("lists") / "test300.txt"
    picked = [i for c in range(10) for i in [j for j in range(len(labels)) if labels[j] == c][:30]]
    path.write_text("# index label\n" + "".join(f"{i} {labels[i]}\n" for i in picked))
    return str(path)


@pytest.fixture
def tiny(tmp_path, small_test_list):
    """Overrides for a tiny deterministic run: ~400 LT images, ResNet-8, 3 short epochs."""
    return tiny_overrides(tmp_path, small_test_list)


def tiny_overrides(out_dir, small_test_list):
    return [f"run.out_dir={out_dir}", "run.deterministic=true", "data.n_max=100",
            "data.rho=10", "data.batch_size=32", "data.eval_batch_size=300",
            f"data.test_list={small_test_list}", "model.name=resnet8", "sched.epochs=3",
            "sched.warmup_epochs=1", "sched.milestones=[2]", "sched.gamma=0.1",
            "eval.every_epochs=1", "engine.log_every=5", "engine.progress=lines"]


KILL_PLUGINS = os.path.join(ROOT, "tests", "plugins")   # sitecustomize: tests/kill_points.py


def run_cli(*args, env=None, check=True):
    """Run a repository script in a fresh interpreter, as a user would. An env with
    LTT_TEST_KILL (or LTT_KILL_AT_STEP) installs that kill point (tests/kill_points.py)."""
    env = env or {}
    full_env = dict(os.environ, **env)   # the project is installed (pip install -e .)
    if {"LTT_TEST_KILL", "LTT_KILL_AT_STEP"} & set(env):   # the plugin imports tests/
        full_env["PYTHONPATH"] = os.pathsep.join([KILL_PLUGINS, ROOT])
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
