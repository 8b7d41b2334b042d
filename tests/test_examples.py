"""Every example runs at a smoke size (a few steps), so none of them rots."""

import os
import pathlib
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
    ['cnn_nnx.py', '--smoke', '--optimizers', 'mkor'],
    ['bert_mlm.py', '--smoke'],
    pytest.param(['data_parallel.py', '--smoke', '--mode', 'pmap'], marks=SLOW),
    pytest.param(['data_parallel.py', '--smoke', '--mode', 'shard_map'], marks=SLOW),
    ['data_parallel.py', '--smoke', '--mode', 'distributed'],
    ['data_parallel.py', '--smoke', '--mode', 'distributed-sharded'],
]


def run(args, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['MPLBACKEND'] = 'Agg'
  proc = subprocess.run([sys.executable, str(ROOT / 'examples' / args[0]), *args[1:]],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize('args', EXAMPLES, ids=lambda a: ' '.join(a[:1] + a[2:3] + a[-1:]))
def test_example_runs(args, tmp_path):
  out = run(args, tmp_path)
  if args[0] == 'data_parallel.py':
    assert 'max |param difference|' in out
    if 'sharded' in args[-1]:
      assert out.count('factor state:') == 2  # both processes checked their split
  elif not args[0].startswith('quickstart'):
    assert '| optimizer |' in out


def test_demo_writes_table_and_plot(tmp_path):
  out = run(['demo.py', '--steps', '5', '--out', str(tmp_path / 'demo')], tmp_path)
  assert '| MKOR+LAMB |' in out and (tmp_path / 'demo' / 'loss.png').stat().st_size > 1000


def test_quickstart_runs_without_tqdm(tmp_path):
  """``pip install -e .`` has no tqdm: the quickstart must not need it."""
  blocker = tmp_path / 'sitecustomize.py'
  blocker.write_text('import sys\nsys.modules["tqdm"] = None\nsys.modules["tqdm.auto"] = None\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = str(tmp_path) + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, str(ROOT / 'examples' / 'quickstart.py'), '--smoke'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'final training loss' in proc.stdout
