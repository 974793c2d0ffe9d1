# The two commands of the README. Each builds .venv first if needed (scripts/setup.sh is idempotent).
PY := .venv/bin/python

.PHONY: setup run test lint bench
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m learner.main $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m bench $(ARGS)
