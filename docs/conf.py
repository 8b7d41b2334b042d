"""Sphinx configuration of the mkor_optax documentation (`make docs`)."""

import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the API pages import the package; the executed notebook runs on the CPU
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# the notebook's kernel reads its settings from docs/_ipython (a quiet start-up)
os.environ['IPYTHONDIR'] = str(ROOT / 'docs' / '_ipython')

project = 'mkor_optax'
author = 'the mkor_optax authors'
copyright = '2026, the mkor_optax authors'
release = version = __import__('mkor_optax').__version__  # written once: mkor_optax/_version.py

extensions = [
    'myst_nb',  # MyST markdown pages and executed notebooks (myst-parser included)
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',  # Google-style Args:/Returns: sections
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb', '.ipynb': 'myst-nb'}  # autosummary writes .rst stubs
exclude_patterns = ['_build', 'README.md']
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist', 'substitution']
# Measured numbers are never typed into a page: ``{{ name }}`` takes them from
# the result files under results/ (docs/measured.py; tests/test_numbers.py).
sys.path.insert(0, str(ROOT / 'docs'))
import measured  # noqa: E402
myst_substitutions = measured.substitutions()
myst_heading_anchors = 3

autosummary_generate = True
# docs/_templates/autosummary/: a page per public name shows its docstring
# only (states describe their fields there), no inherited members.
templates_path = ['_templates']
# No default options (members and base classes are off by default): under
# Sphinx 9 a default overrides a template's own ``:members:``, and
# ``'show-inheritance': False`` still showed the bases.
autodoc_default_options = {}
autodoc_typehints = 'description'
autodoc_typehints_description_target = 'documented'  # types join the Args:/Returns: entries
autodoc_type_aliases = {'optax.ScalarOrSchedule': 'optax.ScalarOrSchedule'}  # not its expansion
autodoc_member_order = 'bysource'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # a state's Attributes: give shapes and dtypes in words

# Every cross-reference to a name of mkor_optax must resolve. Third-party
# types in signatures have no target here (intersphinx cannot reach the
# network), so they are exempt.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(jax|jaxlib|optax|flax|numpy|collections\.abc|typing)(\..*)?'),
]

# The quickstart notebook is executed at every build (300 steps of a small MLP
# on the CPU, about half a minute); a cell that raises fails the build.
nb_execution_mode = 'force'
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True

html_theme = 'sphinx_book_theme'
html_title = 'mkor_optax'
html_static_path = ['_static']
html_css_files = ['custom.css']  # code wraps and tables fit at 1280 px (docs/check_pages.py)
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
    'use_download_button': True,
}
suppress_warnings = ['mystnb.unknown_mime_type']


def _copy_inputs(app):
  """Pages include the repository's notebook and result plots: copy them into
  the source tree (``_generated/``) so Sphinx reads them as its own files."""
  out = pathlib.Path(app.srcdir) / '_generated'
  shutil.rmtree(out, ignore_errors=True)
  (out / 'results').mkdir(parents=True)
  shutil.copy(ROOT / 'notebooks' / 'quickstart.ipynb', out / 'quickstart.ipynb')
  for png in ROOT.glob('results/**/*.png'):
    target = out / 'results' / png.relative_to(ROOT / 'results')
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, target)


def setup(app):
  app.connect('builder-inited', _copy_inputs)
