# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE := 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch is pinned here to the CPU build that lies on local disk; the package itself asks for a range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,test]"
	touch $@

demo: install
	$(PY) -m fleximmt demo --out demo-output

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
