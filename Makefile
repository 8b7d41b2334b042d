# make demo / make test create and fill .venv on first use, and fill it again
# when pyproject.toml or the version (mkor_optax/_version.py) changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all test-wheel dist bench compare compare-kfac-jax docs clean

$(STAMP): pyproject.toml mkor_optax/_version.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,examples,release]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)  # one worker per core; the 15 slowest tests are listed at the end
	$(PY) -m pytest -q -n auto --durations=15

test-all: $(STAMP)  # the slow end-to-end runs too
	$(PY) -m pytest -q -n auto --durations=15 -m ''

# the wheel and the sdist, into dist/
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .

# the tests against the built wheel, installed in a fresh virtual environment
# outside the tree (what .ci/run does after make test); pytest arguments in
# ARGS, e.g. make test-wheel ARGS="-k 'release or optax_contract'"
test-wheel: $(STAMP)
	.ci/run wheel $(ARGS)

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
	rm -rf $(VENV) .venv-kfac .pytest_cache .jax_cache docs/_build docs/_autosummary docs/_generated \
	  dist build mkor_optax.egg-info

# the documentation site: docs/_build/html/index.html (warnings are errors).
# -q: Sphinx prints warnings and errors only; at its default verbosity
# myst-parser and myst-nb log their whole parser configurations (every
# measured-number substitution included) and every page's progress.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,examples,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/_autosummary docs/_generated
	$(PY) -m sphinx -q -W --keep-going -b html docs docs/_build/html
