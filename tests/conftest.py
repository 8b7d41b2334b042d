"""Test set-up: 4 fake CPU devices (must be set before jax is imported), and
a persistent compilation cache shared by the tests (and the processes they
start), so a computation compiled by one test is loaded, not recompiled, by
the next; it lives in ``.jax_cache/`` (``make clean`` removes it)."""

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.05')
sys.path.insert(0, os.path.join(ROOT, 'examples'))
