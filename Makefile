# The two commands of the README. Both set up .venv (and apt packages) on first use.
PY := .venv/bin/python

.PHONY: setup demo test table ssp-table semi-table fidelity-tables fidelity-moco4x inspect bench gpu-check clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) launchers/train.py configs/fmnist_lt_moco_crt.yaml

test: setup
	$(PY) -m pytest -q tests

# The README's tables (2 CPU cores; each run resumable, re-running skips finished ones).
# Supervised baselines: CE, CB-CE, Focal, LDAM-DRW, CE-DRW, CE-DRS, 2 seeds.
table: setup
	$(PY) tools/run_table.py --out runs/table --jobs 2

# Self-supervised pre-training: CE / cRT / LDAM-DRW without SSP, after MoCo, after Rotation.
ssp-table: setup
	$(PY) tools/run_table.py --out runs/ssp_table --jobs 2 --seeds 0 1 --configs \
	  configs/fmnist_lt_baselines.yaml configs/fmnist_lt_moco_crt.yaml \
	  configs/fmnist_lt_rotation_ldam_drw.yaml

# Semi-supervised: the paper's Table 1 and Figure 2 on Fashion-MNIST-LT.
semi-table: setup
	$(PY) tools/run_semi_table.py --out runs/semi_table --jobs 2 --seeds 0

# Issue 13's reruns with the reference settings (docs/fidelity.md), 3 seeds, ~2 h of 2 cores:
# the supervised rows not in the SSP run (its fmnist_lt_baselines gives CE, cRT, LDAM-DRW),
# CE / cRT / LDAM-DRW without SSP and after MoCo, and Table 1's endpoints (labels alone,
# rho_U = 1, rho_U = 2 rho; CE and LDAM-DRW).
fidelity-tables: setup
	$(PY) tools/run_table.py --out runs/fidelity_table --jobs 2 --seeds 0 1 2 --configs \
	  configs/fmnist_lt_cb_ce.yaml configs/fmnist_lt_focal.yaml configs/fmnist_lt_ce_drw.yaml \
	  configs/fmnist_lt_ce_drs.yaml
	$(PY) tools/run_table.py --out runs/fidelity_ssp --jobs 2 --seeds 0 1 2 --configs \
	  configs/fmnist_lt_baselines.yaml configs/fmnist_lt_moco_crt.yaml
	$(PY) tools/run_semi_table.py --out runs/fidelity_semi --jobs 2 --seeds 0 1 2 \
	  --rho-u 1 2rho --relevance 0

# The SSP table's MoCo point at 4x the pre-training epochs (one seed).
fidelity-moco4x: setup
	$(PY) tools/run_table.py pretrain.sched.epochs=120 engine.threads=1 --out runs/fidelity_moco4x \
	  --jobs 1 --seeds 0 --configs configs/fmnist_lt_moco_crt.yaml

# Representation of CE without and with MoCo pre-training (needs `make fidelity-tables`).
A ?= runs/fidelity_ssp/fmnist_lt_baselines_s0/ce
B ?= runs/fidelity_ssp/fmnist_lt_moco_crt_s0/ce
inspect: setup
	$(PY) tools/inspect_pair.py $(A) $(B) --names CE "CE + MoCo" --out docs/inspect_ce_vs_moco

bench: setup
	$(PY) tools/bench_train.py
	$(PY) tools/bench_loaders.py
	$(PY) tools/bench_features.py

# GPU readiness (README): every GPU path checked in under 8 minutes, report in docs/gpu_check.md.
# On a CPU machine: make gpu-check ARGS='--cpu-smoke --out /tmp/gpu_smoke'
gpu-check: setup
	$(PY) tools/gpu_check.py --out docs/gpu_check $(ARGS)

clean:
	rm -rf runs .pytest_cache
