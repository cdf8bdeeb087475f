# Two set-up commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision for this platform (see README; PyPI's x86_64 build is a CUDA build, and runs on the CPU).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
UV_PIN := uv==0.13.9
UV_INSTALL := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY)
STAMP := $(VENV)/.installed

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: venv demo test test-fast bench clean constraints

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(UV_PIN)
	# uv installs torch and the rest from constraints.txt: 50 s here with an empty uv cache,
	# 32-41 s with a warm one, against about 2 min for pip. Bytecode is compiled at install, as pip
	# does: where PYTHONDONTWRITEBYTECODE is set, every process (each Ray worker) would
	# otherwise compile Ray, torch, MLflow... from source.
	$(UV_INSTALL) -c constraints.txt $(TORCH_PINS) -e '.[test]'
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
