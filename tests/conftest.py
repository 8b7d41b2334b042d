"""Test set-up, before jax is imported:

* 4 fake CPU devices;
* fast compiles: the tests' programs are tiny, so compiling them, not running
  them, is what the suite spends its time on. LLVM at optimisation level 0
  and XLA's older loop emitters instead of its fusion emitters (the default
  since jax 0.5) compile a step about 2.7x faster and halve the suite's time.
  Long training runs inside one program are compiled with XLA's defaults
  (``helpers.compiled_optimised``);
* a persistent compilation cache in ``.jax_cache/`` (``make clean`` removes
  it) shared by the tests and the processes they start. Programs with host
  callbacks (every guarded update here) are not cached by JAX.
"""

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                      '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.05')
sys.path.insert(0, os.path.join(ROOT, 'examples'))


import pytest  # noqa: E402


@pytest.fixture
def jit_warnings_on():
  """Compiled steps traced in the test carry the NumericalWarning checks
  (``mkor_optax.jit_warnings(True)``; off by default); the default comes back after."""
  import mkor_optax
  with mkor_optax.jit_warnings(True):
    yield


from crash_retry import pytest_handlecrashitem, pytest_report_teststatus  # noqa: E402,F401
