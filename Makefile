# cilia: `make demo` runs the demo on a lab, `make test` runs every test tier.
SHELL := /bin/bash
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
CLANG  ?= clang
ARCH_INC := /usr/include/$(shell uname -m)-linux-gnu
BPF_CFLAGS := -O2 -g -target bpf -mcpu=v3 -Wall -Werror -Ibpf/include -I$(ARCH_INC)
BPF_SRC := $(wildcard bpf/*.c)
BPF_OBJ := $(patsubst bpf/%.c,build/%.o,$(BPF_SRC))
BPF_HDR := $(wildcard bpf/include/*.h)

.PHONY: all deps venv bpf test test-unit test-datapath test-netns test-e2e demo bench clean

all: deps bpf

build/.deps: scripts/install-deps.sh
	@mkdir -p build
	bash scripts/install-deps.sh
	@touch $@

deps: build/.deps venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

build/%.o: bpf/%.c $(BPF_HDR) build/.deps
	@mkdir -p build
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

bpf: $(BPF_OBJ)

test: deps bpf
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: deps bpf
	$(PY) -m pytest -q tests/unit
test-datapath: deps bpf
	$(PY) -m pytest -q tests/datapath
test-netns: deps bpf
	$(PY) -m pytest -q tests/netns
test-e2e: deps bpf
	$(PY) -m pytest -q tests/e2e

demo: deps bpf
	$(VENV)/bin/python -m cilia.demo

bench: deps bpf
	$(PY) -m bench.run

clean:
	rm -rf build
