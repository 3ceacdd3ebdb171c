# resdense: setup / data / demo / test / bench. Every target is idempotent and works offline
# once the packages it needs are on disk (or reachable on the package registries).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser slurm demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,onnx,tensorboard]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root or sudo once).
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
	    || { echo "could not install dataset-fashion-mnist; pass --data-dir or --download to resdense"; exit 1; }; \
	  echo "Fashion-MNIST: $(FMNIST)"; \
	fi

# Debian's chromium, for the tests that render the reports in a headless browser. Not fatal:
# without it those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; } \
	    && echo "chromium: $$(command -v chromium)" \
	    || echo "could not install chromium (apt-get); the report rendering tests will skip"; \
	fi

# Debian's Slurm and munge, for the tests that start a one-node Slurm (job arrays, requeue, srun).
# Not fatal: without them (or without root) those tests skip and say why.
slurm:
	@if command -v sbatch >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then \
	  echo "slurm: $$(slurmd -V 2>/dev/null)"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; }; } \
	    && echo "slurm: $$(slurmd -V 2>/dev/null)" \
	    || echo "could not install slurm-wlm and munge (apt-get); the Slurm tests will skip"; \
	fi

demo: setup
	$(BIN)/resdense info resnet56

test: setup data browser slurm
	$(BIN)/python -m pytest -q

bench: setup data
	$(BIN)/resdense bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
