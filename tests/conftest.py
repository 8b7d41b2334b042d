"""Test set-up, before jax is imported:

* 4 fake CPU devices;
* LLVM optimisation level 0: the tests' programs are tiny, so compiling them,
  not running them, is what the suite spends its time on (about 30% less);
* a persistent compilation cache in ``.jax_cache/`` (``make clean`` removes
  it) shared by the tests and the processes they start. Programs with host
  callbacks (every guarded update here) are not cached by JAX, so it saves
  about a tenth of a warm run.
"""

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.05')
sys.path.insert(0, os.path.join(ROOT, 'examples'))
