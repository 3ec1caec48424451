# Two commands do all the set-up on a fresh Debian machine with Python 3.11:
#   make run    -- create .venv, install the package, install Fashion-MNIST and jemalloc, run the main job
#   make test   -- create .venv, install the package with its dev extra, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian packages: the default data set, and jemalloc (manifold_lab/allocator.py; optional, faster
# training: without it the entry points fall back to glibc huge pages)
data:
	@if [ ! -d "$(FASHION_MNIST_DIR)" ] || [ ! -e /usr/lib/$$(uname -m)-linux-gnu/libjemalloc.so.2 ]; then \
	  echo "installing Debian packages dataset-fashion-mnist and libjemalloc2"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist libjemalloc2; \
	fi

run: setup data
	$(BIN)/python -m manifold_lab.spiral --out figures/quick
	$(BIN)/python -m ablations.run all --preset quick --out results
	$(BIN)/python -m ablations.figures --preset quick --results results --out figures/quick

test: setup
	$(BIN)/python -m pytest -n 2 --dist worksteal -q --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
