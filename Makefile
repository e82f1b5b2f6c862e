# The README's commands. Every target sets up .venv first (idempotent).
PYTHON_VENV := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env test test-fast gpu-check demo demo-compare demo-check demo-paper demo-routing docs census

env:
	bash tools/setup_env.sh

# the full suite, as CI runs it; prints the 15 slowest tests
test: env
	$(PYTHON_VENV) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

# the inner loop (< 3 min): no subprocesses, training runs or GPU
test-fast: env
	$(PYTHON_VENV) -m pytest -q -m "not slow and not cuda" $(PYTEST_ARGS) tests

# the GPU path in one command (its own .venv-cuda; without a GPU it says it skipped)
gpu-check:
	bash tools/gpu_check.sh

demo: env
	$(PYTHON_VENV) tools/demo.py

# dense, MoE soft and MoE hard trained alike, side by side (about 3× the demo's time)
demo-compare: env
	$(PYTHON_VENV) tools/demo.py --compare

# does this machine get the README's figures? Seeds 0, 1, 2, then seed 0 with torch,
# oneDNN and MKL held to AVX2 (what another CPU would give): each must reach AP 0.30 and
# lie within the README's mean ± 2 sd (about 4× the demo's time)
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
demo-check: env
	$(PYTHON_VENV) tools/demo.py --seeds 3 --no-per-expert --check --work-dir work_dirs/demo-check
	$(AVX2) $(PYTHON_VENV) tools/demo.py --no-per-expert --check --work-dir work_dirs/demo-check-avx2

# the paper's protocol: the dense model (demo-compare's, else trained), then only its
# classification branch fine-tuned: soft, hard, equal weights × fresh / copied experts,
# and the dense branch (control), 3 seeds; work_dirs/demo_paper/paper_protocol.md
demo-paper: env
	$(PYTHON_VENV) tools/demo.py --paper

# routing granularity: per image, per location (subnet, single conv, μMoE, supervised by
# relative scale), per object (Faster R-CNN RoI head) and a MoE FPN, trained alike on the
# toy (seed 0; about 9× the demo's time, 74 min on 2 cores)
demo-routing: env
	$(PYTHON_VENV) tools/demo.py --routing

# MoE inserted three ways into one config of every detector family of mmdet 3.3:
# train a step, predict, tags; rewrites the table in docs/zoo.md (about 25 min)
census: env
	$(PYTHON_VENV) -W ignore tools/moe_census.py --out docs/zoo.md

# the documentation site from docs/ into build/docs/ (open build/docs/index.html);
# --strict: any warning, a broken link or anchor between the pages included, fails
docs: env
	$(PYTHON_VENV) -m mkdocs build --strict --site-dir build/docs
