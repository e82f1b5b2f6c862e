# The README's commands. `make test` and `make demo` set up .venv first (idempotent).
PYTHON_VENV := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env test demo demo-compare

env:
	bash tools/setup_env.sh

test: env
	$(PYTHON_VENV) -m pytest -q $(PYTEST_ARGS) tests

demo: env
	$(PYTHON_VENV) tools/demo.py

# dense, MoE soft and MoE hard trained alike, side by side (about 3× the demo's time)
demo-compare: env
	$(PYTHON_VENV) tools/demo.py --compare
