# Two entry points, both self-installing into ./.venv (CPU build of torch, see constraints.txt):
#   make demo   -> phantom, short training, harmonization of held-out subjects, metrics
#   make test   -> the test suite
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
STAMP   = $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/ihf-bids-demo demo_out

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python bench/bench_core.py

clean:
	rm -rf $(VENV) demo_out
