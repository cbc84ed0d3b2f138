# Two commands on a fresh machine (README): `make demo` and `make test`. Each installs what it needs
# into .venv first (CPU torch here; on a GPU machine set TORCH_SPEC to the CUDA build you want).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# the versions CI tested (deploy/constraints.txt): a new release upstream cannot break a fresh install
PIP_INSTALL := $(PY) -m pip install -q -c deploy/constraints.txt

.PHONY: demo test up clean constraints

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The platform and the trainer: enough for the demo and `tuneforge up`.
$(VENV)/.installed-worker: pyproject.toml deploy/constraints.txt | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PIP_INSTALL) -e '.[worker]'
	touch $@

# Everything the test suite exercises (Kubernetes client and schemas, Helm, llama.cpp, moto, Triton).
$(VENV)/.installed-test: pyproject.toml deploy/constraints.txt $(VENV)/.installed-worker
	$(PIP_INSTALL) -e '.[worker,cluster,test]'
	touch $@

demo: $(VENV)/.installed-worker
	$(PY) -m scheduler demo

up: $(VENV)/.installed-worker
	$(PY) -m scheduler up

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .tuneforge

# Moves deploy/constraints.txt to the newest releases pyproject.toml allows (then run `make test`).
constraints:
	rm -rf .venv-constraints && python3 -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-constraints/bin/python -m pip install -q -e '.[worker,cluster,test]'
	{ sed -n '1,/^# torch and triton/p' deploy/constraints.txt; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v -E '^(torch|triton)=='; } > .constraints.new
	@grep -q '^transformers==' .constraints.new || { echo "make constraints: the freeze is incomplete; deploy/constraints.txt is unchanged"; exit 1; }
	mv .constraints.new deploy/constraints.txt && rm -rf .venv-constraints
