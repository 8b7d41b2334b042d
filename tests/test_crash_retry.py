"""The suite's rule for crashed xdist workers (tests/crash_retry.py): a test
that kills its worker once runs again and may pass; one that kills it twice,
or fails its assertion, fails the run."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_pytest(tmp_path, body):
  (tmp_path / 'conftest.py').write_text(
      'from crash_retry import pytest_handlecrashitem, pytest_report_teststatus\n')
  (tmp_path / 'test_it.py').write_text(textwrap.dedent(body))
  env = dict(os.environ, PYTHONPATH=TESTS, MARK=str(tmp_path / 'crashed_once'))
  return subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-n', '2', '-p', 'no:cacheprovider', str(tmp_path)],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_test_that_crashes_once_is_rerun_and_passes(tmp_path):
  got = run_pytest(tmp_path, '''
      import os
      def test_crashes_once():
        if not os.path.exists(os.environ['MARK']):
          open(os.environ['MARK'], 'w').close()
          os.abort()
      def test_other():
        pass
  ''')
  assert got.returncode == 0, got.stdout + got.stderr
  assert '2 passed, 1 rerun' in got.stdout, got.stdout


def test_a_test_that_always_crashes_or_fails_fails_the_run(tmp_path):
  got = run_pytest(tmp_path, '''
      import os
      def test_always_crashes():
        os.abort()
      def test_fails():
        assert False
  ''')
  assert got.returncode == 1, got.stdout + got.stderr
  assert '2 failed, 1 rerun' in got.stdout, got.stdout
