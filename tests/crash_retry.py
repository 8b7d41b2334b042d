"""pytest-xdist hooks: a test whose worker process dies is run once more.

A fatal signal inside XLA's CPU runtime killed a worker once in CI, in a pmap
test that passes alone and in every other run of the suite. Such a crash says
nothing about the test's assertion, so the test is scheduled once more, on the
fresh worker that xdist starts in the dead one's place, and the run's summary
counts it as ``rerun``. Only a crash is retried: a failed assertion or an
exception is reported as it is, and a second crash of the same test fails the
run.
"""

import pytest

_CRASHED = set()


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_handlecrashitem(crashitem, report, sched):
  if crashitem in _CRASHED:
    return  # the second crash: reported as failed
  _CRASHED.add(crashitem)
  sched.mark_test_pending(crashitem)
  report.outcome = 'rerun'


def pytest_report_teststatus(report, config):
  del config
  if report.outcome == 'rerun':
    return 'rerun', 'R', ('RERUN', {'yellow': True})
  return None
