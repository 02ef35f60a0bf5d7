# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv in the repository root when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a range would pull a multi-GB CUDA build on machines without a local wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# trains the tiny preset on the embedded corpus (about 8 minutes on 2 CPU cores), plots the run and
# samples from the trained model, plainly and with MTP speculative decoding
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/longcat train --out runs/demo
	$(VENV)/bin/longcat plot runs/demo
	$(VENV)/bin/longcat generate runs/demo/final --prompt "And God said unto Moses," --max-new-tokens 48 --stats
	$(VENV)/bin/longcat generate runs/demo/final --prompt "The os.path module" --max-new-tokens 48 --speculative --stats

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

test: $(STAMP) lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
