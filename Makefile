# Two commands do everything on a fresh machine:
#   make demo   install, build the offline digits dataset, train a small ViT, evaluate
#   make test   install, run the whole test suite
# Both create (or reuse) the virtual environment in $(VENV).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= workdirs/digits_demo
# Two workers, one test file each: a file's shared fixtures (one compiled model, one
# batched timm subprocess) are built once. `make test PYTEST_ARGS=` runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_WORKDIR)
	$(PY) -m vit_jax.main --config=configs/digits_vit.py --workdir=$(DEMO_WORKDIR)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdirs build *.egg-info
