# The two commands a newcomer needs:
#   make demo   set up .venv and run the main job on data and a model this repo ships or builds
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

# Reinstall only when the pins or the project metadata change.
$(STAMP): requirements/ci.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/ci.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure, so an empty run fails.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache
