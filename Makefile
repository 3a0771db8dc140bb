# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
# `make test-vision` runs the tests marked `vision` (RAFT, SAM 2 video: they need torchvision) in a
# second virtualenv, .venv-vision, with a torch/torchvision pair that loads together (about 5.5 GB).
VENV ?= .venv
PY := $(VENV)/bin/python
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
# ComfyUI's source (make test-comfy starts it as a server); its requirements join .venv-vision
COMFYUI ?= ../shared/comfyui
PYTHON ?= python3
export HF_HUB_OFFLINE := 1

.PHONY: install install-vision install-comfy demo test test-vision test-comfy lint format bench clean

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

# ComfyUI's requirements (all but torch, torchvision and torchaudio, which .venv-vision has) in .venv-vision:
# ComfyUI loads with its torch/torchvision pair; one environment for both, built once and reused.
install-comfy: $(VISION_VENV)/.comfy-installed

$(VISION_VENV)/.comfy-installed: $(VISION_VENV)/.installed $(COMFYUI)/requirements.txt
	grep -v -E '^(torch|torchvision|torchaudio)[[:space:]]*$$' $(COMFYUI)/requirements.txt > $(VISION_VENV)/comfy-requirements.txt
	$(VISION_PY) -m pip install -q -r $(VISION_VENV)/comfy-requirements.txt
	touch $@

demo: install
	$(PY) -m fleximmt demo --out demo-output

# the tests marked `vision` run in `make test-vision`, those marked `comfy` in `make test-comfy`; here they are deselected
test: install
	$(PY) -m pytest -q -m "not vision and not comfy"

# only the tests marked `vision`; a missing torchvision fails them here (tests/conftest.py)
test-vision: install-vision
	$(VISION_PY) -m pytest -q -m "vision and not comfy"

# only the tests marked `comfy`: the node pack in a real ComfyUI server (COMFYUI) started by the tests
test-comfy: install-comfy
	COMFYUI=$(abspath $(COMFYUI)) $(VISION_PY) -m pytest -q -m comfy

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
