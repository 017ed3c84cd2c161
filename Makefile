# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv when missing,
# installs fewstep with the pinned torch (constraints.txt), then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fewstep demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) -m fewstep bench accuracy --target gmm

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
