"""The release of mkor_optax: the one place its version is written.

``pyproject.toml`` reads it (setuptools' dynamic version), ``mkor_optax``
exports it as ``__version__`` and the documentation shows it. A release
that changes a state's structure says so in CHANGELOG.md.
"""

__version__ = '0.2.0'
