# The two commands a newcomer needs:  make demo  (set up + run the loop)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := python3 -m uv
# The CPU build of torch lies in this folder on our machines; elsewhere PyPI's torch is used.
TORCH_WHEELS ?= /opt/wheels
TORCH_SPEC := $(if $(wildcard $(TORCH_WHEELS)/torch-2.13.0+cpu-*.whl),torch==2.13.0+cpu,torch==2.13.0)
export UV_COMPILE_BYTECODE := 1
export UV_LINK_MODE := copy

.PHONY: setup demo test ui clean

$(VENV)/.installed: pyproject.toml
	python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	$(UV) venv -q --allow-existing --python python3.11 $(VENV)
	$(UV) pip install -q --python $(PY) --find-links $(TORCH_WHEELS) "$(TORCH_SPEC)"
	$(UV) pip install -q --python $(PY) --find-links $(TORCH_WHEELS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/recsys demo

test: setup
	$(VENV)/bin/pytest

ui: setup
	$(VENV)/bin/recsys ui

clean:
	rm -rf var mlflow/mlflow.db mlflow/artifacts
