"""Every example runs at a smoke size (a few steps), so none of them rots.

The examples run inside the test process (as ``python examples/X.py`` would
run them: ``__main__``, their own argv, a fresh working directory), which
saves an interpreter start and a jax import each; the ``jax.distributed``
runs start processes of their own."""

import json
import os
import pathlib
import runpy
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Marked slow (make test-all): what a faster test covers too. Every optimizer
# through the example's loop (each has its own tests and the registry runs
# in benchmarks), and the single-process pmap / shard_map modes (the
# library's behaviour there is tests/test_parallel.py's; the example's
# shard_map code runs in the 'distributed' mode below).
SLOW = pytest.mark.slow
EXAMPLES = [
    ['quickstart.py', '--smoke'],
    ['quickstart_nnx.py', '--smoke'],
    ['autoencoder.py', '--smoke', '--optimizers', 'lamb,mkor,mkor_h'],
    pytest.param(['autoencoder.py', '--smoke', '--optimizers', 'lamb,mkor,mkor_h,kfac,eva,sonew,adamw'],
                 marks=SLOW),
    ['cnn.py', '--smoke'],
    ['resnet.py', '--smoke'],
    ['cnn_nnx.py', '--smoke', '--optimizers', 'mkor'],
    ['bert_mlm.py', '--smoke'],
    pytest.param(['data_parallel.py', '--smoke', '--mode', 'pmap,shard_map'], marks=SLOW),
    # both jax.distributed modes in one pair of processes
    ['data_parallel.py', '--smoke', '--mode', 'distributed,distributed-sharded'],
]


def run_here(args, tmp_path, monkeypatch, capsys):
  """``python examples/<args[0]> <args[1:]>`` in this process; its stdout."""
  path = str(ROOT / 'examples' / args[0])
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setattr(sys, 'argv', [path, *args[1:]])
  capsys.readouterr()
  try:
    runpy.run_path(path, run_name='__main__')
  except SystemExit as e:
    assert e.code in (0, None), capsys.readouterr()
  return capsys.readouterr().out


def run(args, tmp_path):
  env = dict(os.environ, MPLBACKEND='Agg')  # the example sets its own device count
  proc = subprocess.run([sys.executable, str(ROOT / 'examples' / args[0]), *args[1:]],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize('args', EXAMPLES, ids=lambda a: ' '.join(a[:1] + a[2:3] + a[-1:]))
def test_example_runs(args, tmp_path, monkeypatch, capsys):
  own_process = args[0] == 'data_parallel.py'  # XLA_FLAGS before jax, or jax.distributed
  out = run(args, tmp_path) if own_process else run_here(args, tmp_path, monkeypatch, capsys)
  if args[0] == 'data_parallel.py':
    modes = args[-1].split(',')
    processes = 2 if modes[0].startswith('distributed') else 1
    for mode in modes:  # every process checked every mode against one device
      assert len(re.findall(rf'^{mode}: .*max \|param difference\|', out, re.M)) == processes, out
      if mode != 'pmap':  # and the sketches of one global batch against its covariances
        assert len(re.findall(rf'^{mode}: 1024 sketches vs .*\(limit 6\)$', out, re.M)) == processes
    assert out.count('max |param difference|') == processes * len(modes)
    if 'distributed-sharded' in modes:
      assert out.count('factor state:') == 2  # both processes checked their split
  elif not args[0].startswith('quickstart'):
    assert '| optimizer |' in out


def test_demo_writes_table_and_plot(tmp_path, monkeypatch, capsys):
  out = run_here(['demo.py', '--steps', '5', '--out', str(tmp_path / 'demo')], tmp_path, monkeypatch,
                 capsys)
  assert '| MKOR+LAMB |' in out and (tmp_path / 'demo' / 'loss.png').stat().st_size > 1000
  # the cost per step timed as benchmarks/step_cost.py times it, in the table and the verdict
  saved = json.loads((tmp_path / 'demo' / 'demo.json').read_text())['rows']
  blocks = saved['MKOR+LAMB']['ms_per_step_blocks'] / saved['LAMB']['ms_per_step_blocks']
  assert f'a MKOR+LAMB step costs {blocks:.2f}x a LAMB step' in out


def test_quickstart_runs_without_tqdm(tmp_path, monkeypatch, capsys):
  """``pip install -e .`` has no tqdm: the quickstart must not need it."""
  for name in ('tqdm', 'tqdm.auto'):
    monkeypatch.setitem(sys.modules, name, None)  # import tqdm raises ImportError
  monkeypatch.delitem(sys.modules, 'common', raising=False)  # re-imported without tqdm
  out = run_here(['quickstart.py', '--smoke'], tmp_path, monkeypatch, capsys)
  assert 'final training loss' in out
