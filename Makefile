# The two commands of the README. Both set up .venv (and apt packages) on first use.
PY := .venv/bin/python

.PHONY: setup demo test table bench clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) launchers/train.py configs/fmnist_lt_moco_crt.yaml

test: setup
	$(PY) -m pytest -q tests

# Fashion-MNIST-LT table of the README (CE, CB-CE, Focal, LDAM-DRW, CE-DRW, CE-DRS; ~15 min)
table: setup
	$(PY) tools/run_table.py --out runs/table

bench: setup
	$(PY) tools/bench_train.py

clean:
	rm -rf runs .pytest_cache
