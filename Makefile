# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
# `make test-vision` runs the tests marked `vision` (RAFT, SAM 2 video: they need torchvision) in a
# second virtualenv, .venv-vision, with a torch/torchvision pair that loads together (about 5.5 GB).
VENV ?= .venv
PY := $(VENV)/bin/python
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
# ComfyUI's sources (make test-comfy starts each as a server): the version users run, and the oldest
# supported; their requirements join .venv-vision
COMFYUI ?= ../shared/comfyui-0.33
COMFYUI_OLDEST ?= ../shared/comfyui
COMFYUI_OLDEST_VERSION = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' $(COMFYUI_OLDEST)/comfyui_version.py)
PYTHON ?= python3
export HF_HUB_OFFLINE := 1

.PHONY: install install-vision install-comfy demo test test-vision test-comfy test-comfy-current test-comfy-oldest lint format bench clean

install: $(VENV)/.installed

# torch is pinned here to the CPU build that lies on local disk; the package itself asks for a range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,test]"
	touch $@

# torchvision 0.28 does not load next to torch 2.13.0 (its operators are missing); this pair does.
# A CUDA build from local disk that runs on a CPU; kept out of .venv so `make demo`/`make test` stay fast.
install-vision: $(VISION_VENV)/.installed

$(VISION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VISION_PY) -m pip install -q -e ".[test,vision]"
	touch $@

# ComfyUI's requirements in .venv-vision, one environment for both ComfyUI versions the comfy tests run
# against, built once and reused: 0.33's requirements.txt (a superset of 0.3.64's but for three pins;
# torch, torchvision and torchaudio left out: .venv-vision has the pair ComfyUI loads with), torchaudio
# 2.11.0 without its dependencies (the newest on the index; it imports beside torch 2.14.1 and 0.33
# imports it at start-up), and in a folder of their own the three packages 0.3.64 pins older
# (frontend 1.27.10, workflow templates, embedded docs), which tests/comfy_server.py puts first on
# the path of a 0.3.64 server only.
install-comfy: $(VISION_VENV)/.comfy-installed

$(VISION_VENV)/.comfy-installed: $(VISION_VENV)/.installed $(COMFYUI)/requirements.txt $(COMFYUI_OLDEST)/requirements.txt
	grep -v -E '^(torch|torchvision|torchaudio)[[:space:]]*$$' $(COMFYUI)/requirements.txt > $(VISION_VENV)/comfy-requirements.txt
	$(VISION_PY) -m pip install -q --no-deps torchaudio==2.11.0
	$(VISION_PY) -m pip install -q -r $(VISION_VENV)/comfy-requirements.txt
	grep -E '^comfyui-(frontend-package|workflow-templates|embedded-docs)==' $(COMFYUI_OLDEST)/requirements.txt \
		> $(VISION_VENV)/comfy-oldest-pins.txt
	rm -rf $(VISION_VENV)/comfyui-$(COMFYUI_OLDEST_VERSION)
	$(VISION_PY) -m pip install -q --no-deps --target $(VISION_VENV)/comfyui-$(COMFYUI_OLDEST_VERSION) \
		-r $(VISION_VENV)/comfy-oldest-pins.txt
	touch $@

demo: install
	$(PY) -m fleximmt demo --out demo-output

# the tests marked `vision` run in `make test-vision`, those marked `comfy` in `make test-comfy`; here they are deselected
test: install
	$(PY) -m pytest -q -m "not vision and not comfy"

# only the tests marked `vision`; a missing torchvision fails them here (tests/conftest.py)
test-vision: install-vision
	$(VISION_PY) -m pytest -q -m "vision and not comfy"

# only the tests marked `comfy`: the node pack in real ComfyUI servers started by the tests, once per version
test-comfy: test-comfy-current test-comfy-oldest

test-comfy-current: install-comfy
	COMFYUI=$(abspath $(COMFYUI)) $(VISION_PY) -m pytest -q -m comfy

test-comfy-oldest: install-comfy
	COMFYUI=$(abspath $(COMFYUI_OLDEST)) $(VISION_PY) -m pytest -q -m comfy

# ruff's formatter and linter (rules in pyproject.toml), on every Python file of the repository
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(VISION_VENV) demo-output .pytest_cache
