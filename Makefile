# Two entry points, each doing all of its set-up on a fresh machine:
#   make demo   - venv + package, then train the embedded dictionary demo offline
#   make test   - venv + test extras (torch CPU 2.13.0), then the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

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
# fixtures are built once: 6-7 instead of 9 minutes of tests on the 2-core machine
TEST_WORKERS ?= 2

test: $(VENV)/.installed-test
	$(BIN)/ruff check gpt2jax tests scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: $(VENV)/.installed-test
	$(BIN)/ruff check gpt2jax tests scripts

clean:
	rm -rf $(VENV) runs
