# make demo / make test create and fill .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench compare compare-kfac-jax docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)  # one worker per core; the 15 slowest tests are listed at the end
	$(PY) -m pytest -q -n auto --durations=15

test-all: $(STAMP)  # the slow end-to-end runs too
	$(PY) -m pytest -q -n auto --durations=15 -m ''

bench: $(STAMP)
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/methods.py

compare: $(STAMP) .venv-kfac/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/compare.py
	.venv-kfac/bin/python benchmarks/kfac_jax_compare.py

# kfac-jax 0.0.8 needs jax 0.9.1 (its step fails on >= 0.9.2) and a flax that accepts it
.venv-kfac/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-kfac
	.venv-kfac/bin/python -m pip install --quiet --upgrade pip
	.venv-kfac/bin/python -m pip install --quiet 'jax==0.9.1' 'jaxlib==0.9.1' 'kfac-jax==0.0.8' \
	  'flax<0.12.8' optax chex scikit-learn matplotlib tqdm
	.venv-kfac/bin/python -m pip install --quiet --no-deps -e .
	touch .venv-kfac/.installed

compare-kfac-jax: .venv-kfac/.installed
	.venv-kfac/bin/python benchmarks/kfac_jax_compare.py

clean:
	rm -rf $(VENV) .venv-kfac .pytest_cache .jax_cache docs/_build docs/_autosummary docs/_generated

# the documentation site: docs/_build/html/index.html (warnings are errors)
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,examples,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/_autosummary docs/_generated
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
