# The two commands of the README, and their parts.
#   make demo   install (if needed) and run the end-to-end demo on ml-100k
#   make test   install (if needed), lint, and run the whole test suite
PY := .venv/bin/python

.PHONY: install demo test lint pytest

install:
	@bash scripts/install.sh

demo: install
	@.venv/bin/recsys demo

lint: install
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .

pytest: install
	@$(PY) -m pytest

test: lint pytest
