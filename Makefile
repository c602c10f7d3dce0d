# Two commands do everything on a fresh machine:
#   make demo         install, build the offline digits dataset, train a small ViT, evaluate
#   make test         install, run the whole test suite: Python 3.12 with the newest
#                     jax/flax/optax/orbax that PyPI serves
#   make test-oldest  the same on Python 3.11 with the oldest supported versions
#                     (setup.py's lower bounds, pinned by .ci/oldest-constraints.txt)
# Each creates (or reuses) its virtual environment. Interpreters: pyenv's 3.12.1 /
# 3.11 where pyenv has them, else python3.12 / python3.11, else python3.

pyenv_python = $(shell p=$$(pyenv prefix $(1) 2>/dev/null) && [ -x "$$p/bin/python" ] && echo "$$p/bin/python")
first_found = $(firstword $(foreach c,$(1),$(shell command -v $(c) 2>/dev/null)))
PYTHON ?= $(or $(call pyenv_python,3.12.1),$(call first_found,python3.12 python3))
PYTHON_OLDEST ?= $(or $(call pyenv_python,3.11),$(call first_found,python3.11 python3))
VENV ?= .venv
VENV_OLDEST ?= .venv-oldest
DEMO_WORKDIR ?= workdirs/digits_demo
# Two workers, one test file each: a file's shared fixtures (one compiled model, one
# batched timm subprocess) are built once. `make test PYTEST_ARGS=` runs serially.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test test-oldest install install-runtime install-oldest clean

install: $(VENV)/.installed
install-runtime: $(VENV)/.installed-runtime
install-oldest: $(VENV_OLDEST)/.installed

# `make demo` installs the package and its runtime dependencies only (no torch);
# `make test` adds the test extra: timm, open_clip and the torch they bring (~5 GB with
# CUDA libraries from PyPI). uv resolves and unpacks wheels several times faster than
# pip; it is itself a pip-installed wheel.
$(VENV)/.installed-runtime: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python --upgrade -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-runtime
	$(VENV)/bin/uv pip install --quiet --python $(VENV)/bin/python --upgrade -e '.[test]'
	touch $@

$(VENV_OLDEST)/.installed: setup.py .ci/oldest-constraints.txt
	$(PYTHON_OLDEST) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install --quiet --upgrade pip uv
	$(VENV_OLDEST)/bin/uv pip install --quiet --python $(VENV_OLDEST)/bin/python \
	    -c .ci/oldest-constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed-runtime
	rm -rf $(DEMO_WORKDIR)
	$(VENV)/bin/python -m vit_jax.main --config=configs/digits_vit.py --workdir=$(DEMO_WORKDIR)

test: $(VENV)/.installed
	$(VENV)/bin/python -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)'
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

test-oldest: $(VENV_OLDEST)/.installed
	$(VENV_OLDEST)/bin/python -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)'
	$(VENV_OLDEST)/bin/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_OLDEST) workdirs build *.egg-info
