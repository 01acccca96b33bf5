# The two commands a newcomer needs: `make serve` and `make test`.
# Both create .venv when it is missing and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test bench pictures clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/unbox serve

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.cams
	$(PY) -m bench.http
	$(PY) -m bench.queue
	$(PY) -m bench.igos
	$(PY) -m bench.sag
	$(PY) -m bench.study

pictures: $(STAMP)
	$(PY) scripts/readme_pictures.py

clean:
	rm -rf $(VENV) build *.egg-info test-artifacts
