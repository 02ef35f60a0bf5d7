# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv in the repository root when it is missing.
# Both install exact versions from constraints.txt; `make test-latest` tries the newest releases instead.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest
# what test-latest runs: everything that talks to transformers, the server stack or the chat template
LATEST_TESTS := tests/test_interop.py tests/test_checkpoint.py tests/serving tests/inference/test_chat_template.py \
	tests/training/test_trainer.py::test_final_checkpoint_loads_in_transformers

.PHONY: demo test test-latest lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip
	# torch first and pinned: a range would pull a multi-GB CUDA build on machines without a local wheel
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
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

# not in CI: the newest release of every dependency (torch stays 2.13.0) in its own environment, so
# an upstream change is seen on purpose; prints the versions it ran with
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	echo torch==2.13.0 > $(LATEST)/torch-only.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-only.txt -e '.[dev]'
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|tokenizers|safetensors|numpy|fastapi|starlette|uvicorn|pydantic|openai|jinja2|torch)=='
	$(LATEST)/bin/python -m pytest -q $(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .ruff_cache runs
