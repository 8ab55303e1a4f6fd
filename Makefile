# dist-sam developer entry points. Quick start: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo bench study clean

venv: $(STAMP)

# Rebuilt only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[all,test]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: venv
	$(PY) -m dist_sam.cli demo

bench: venv
	$(PY) -m benchmarks.throughput --config benchmarks/throughput/configs/cpu.yaml

study: venv
	$(PY) -m benchmarks.study

clean:
	rm -rf $(VENV) runs
