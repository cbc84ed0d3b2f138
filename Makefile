# Two commands on a fresh machine (README): `make demo` and `make test`. Each installs what it needs
# into .venv first (CPU torch here; on a GPU machine set TORCH_SPEC to the CUDA build you want).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test up clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The platform and the trainer: enough for the demo and `tuneforge up`.
$(VENV)/.installed-worker: pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[worker]'
	touch $@

# Everything the test suite exercises (Kubernetes client and schemas, Helm, llama.cpp, moto, Triton).
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-worker
	$(PY) -m pip install -q -e '.[worker,cluster,test]'
	touch $@

demo: $(VENV)/.installed-worker
	$(PY) -m scheduler demo

up: $(VENV)/.installed-worker
	$(PY) -m scheduler up

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .tuneforge
