# Set-up and the two README commands. `make demo` and `make test` create ./.venv on first use
# and install dirio with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dirio demo --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-out
