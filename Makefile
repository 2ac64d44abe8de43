# The two commands of the README. Each does its own set-up (scripts/setup.sh) first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup bench arena test
setup:
	@bash scripts/setup.sh

bench: setup
	$(PY) -m attnlab bench

arena: setup
	$(PY) -m attnlab arena

test: setup
	$(PY) -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)
