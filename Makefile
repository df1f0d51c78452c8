# Set-up and checks for a fresh machine; see README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= qwen2.5-coder-1.5b-instruct
PYTEST_ARGS ?=

.PHONY: install demo test tiny bench mutate clean

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h) scripts/install.sh
	PYSTEER_VENV=$(VENV) scripts/install.sh
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pysteer ablate-test $(MODEL)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

tiny: install
	$(PY) -m pysteer.tiny models/tiny

bench: install
	$(VENV)/bin/pip install -q "torch==2.13.0" "transformers==5.24.0"
	$(PY) benchmarks/run_all.py

mutate: install
	scripts/mutate.sh

clean:
	rm -rf build $(VENV) models/tiny
