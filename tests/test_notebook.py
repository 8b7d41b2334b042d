"""notebooks/quickstart.ipynb executes top to bottom at a tiny size."""

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / 'notebooks' / 'quickstart.ipynb'


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('QUICKSTART_STEPS', '5')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  # one device, as in Colab, and conftest's fast compiles
  fast = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  monkeypatch.setenv('XLA_FLAGS', ' '.join(fast))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                    for o in c.get('outputs', []))
  assert 'MKOR+LAMB' in outputs and 'ms/step' in outputs
  assert "x LAMB's)" in outputs.split('per step, in blocks')[1]  # the step cost, timed in blocks
  assert 'NNX MKOR+LAMB' in outputs  # the NNX loop ran too
