# Two set-up commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: torch/torchvision from the local wheel cache (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
UV_PIN := uv==0.13.9
UV_INSTALL := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY)
STAMP := $(VENV)/.installed

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: venv demo test test-fast bench clean constraints

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) $(UV_PIN)
	# uv installs the rest from constraints.txt (~25 s against pip's 75 s here); torch stays with pip,
	# which takes it from the machine's wheel cache where there is one (uv would download it).
	# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set, every
	# process (each Ray worker) would otherwise compile Ray, MLflow, diffusers... from source.
	$(UV_INSTALL) -c constraints.txt -e '.[test]'
	# mambavision pins old timm/transformers and pulls mamba-ssm: no deps.
	$(UV_INSTALL) --no-deps mambavision==1.2.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dakd pipeline --preset demo

# Everything (CI). `make test-fast`: the same without the end-to-end tests marked slow
# (training runs, sweeps, pipelines), for a quick check while working.
test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=15 -n 2 --dist loadfile --no-loadscope-reorder tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m "not slow" --durations=10 tests

bench: $(STAMP)
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info platform/*.egg-info

# Re-resolve the known-good versions after changing dependencies.
constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^mambavision' > constraints.new
	{ head -3 constraints.txt; cat constraints.new; } > constraints.txt && rm constraints.new
