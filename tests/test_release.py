"""The release: one version (mkor_optax/_version.py) that the package, its
metadata, the documentation and the CHANGELOG agree on; checkpoints of an
earlier release refused with an error that names the release, and carried
across as the CHANGELOG says; and, where .ci/run tests the built wheel
(MKOR_OPTAX_EXPECT_INSTALLED=1), proof that the installed copy is the one
under test."""

import importlib.metadata
import os
import pathlib
import re
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mkor_optax
from helpers import as_restored

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHANGELOG = (ROOT / 'CHANGELOG.md').read_text()
INSTALLED = os.environ.get('MKOR_OPTAX_EXPECT_INSTALLED') == '1'


def params_with_a_wide_layer():
  """Dense 4->8, 8->300 and 300->3 with biases: the 300-wide sides are low-rank by default."""
  def dense(i, o):
    return {'kernel': jnp.zeros((i, o)), 'bias': jnp.zeros((o,))}
  return {'Dense_0': dense(4, 8), 'Dense_1': dense(8, 300), 'Dense_2': dense(300, 3)}


def as_0_1_0(raw: dict, renames: dict, drop=()) -> dict:
  """``raw`` (one state) with 0.1.0's field names, less the fields 0.1.0 lacked."""
  return {renames.get(k, k): v for k, v in raw.items() if k not in drop}


def test_one_version_everywhere():
  version = mkor_optax.__version__
  assert re.fullmatch(r'\d+\.\d+\.\d+', version)
  # the CHANGELOG's newest release is this one, dated
  newest = re.search(r'^## (\S+) \((\d{4}-\d\d-\d\d)\)$', CHANGELOG, re.M)
  assert newest and newest.group(1) == version, 'CHANGELOG.md: no dated entry for ' + version
  # pyproject.toml takes it from _version.py and writes no version of its own
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  assert 'version' not in project['project'] and 'version' in project['project']['dynamic']
  assert (project['tool']['setuptools']['dynamic']['version']
          == {'attr': 'mkor_optax._version.__version__'})
  # so do the documentation and the package itself
  conf = (ROOT / 'docs' / 'conf.py').read_text()
  assert not re.search(r"""^(release|version)\s*=.*['"]\d+\.\d+""", conf, re.M), conf
  init = (ROOT / 'mkor_optax' / '__init__.py').read_text()
  assert not re.search(r"__version__\s*=", init)


def test_package_metadata_is_complete():
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  assert project['license'] == 'Apache-2.0' and project['license-files'] == ['LICENSE']
  assert 'Apache License' in (ROOT / 'LICENSE').read_text()
  urls = project['urls']
  assert urls['Repository'] == 'https://github.com/mkor-optax/mkor_optax'
  assert urls['Issues'] == 'https://github.com/mkor-optax/mkor_optax/issues'
  assert project['authors'] and project['keywords'] and 'Typing :: Typed' in project['classifiers']
  assert 'build' in ' '.join(project['optional-dependencies']['release'])
  assert (ROOT / 'mkor_optax' / 'py.typed').exists()


@pytest.mark.skipif(not INSTALLED, reason='.ci/run sets MKOR_OPTAX_EXPECT_INSTALLED=1 when it '
                    'tests the installed wheel')
def test_the_installed_wheel_is_under_test():
  where = pathlib.Path(mkor_optax.__file__).resolve().parent
  assert not where.is_relative_to(ROOT), f'mkor_optax imported from the source tree: {where}'
  assert 'site-packages' in where.parts
  assert (where / 'py.typed').exists()
  assert importlib.metadata.version('mkor_optax') == mkor_optax.__version__
  files = [str(f) for f in importlib.metadata.files('mkor_optax')]
  assert any(f.endswith('licenses/LICENSE') for f in files), files
  assert 'mkor_optax/py.typed' in files


def test_a_0_1_0_checkpoint_is_refused_naming_the_release():
  params = params_with_a_wide_layer()
  opt = mkor_optax.mkor(1e-2, low_rank=None)   # 0.1.0 began with dense inverses
  raw = as_restored(opt.init(params))
  raw[0] = as_0_1_0(raw[0], {'input_side': 'r_inv', 'output_side': 'l_inv'},
                    drop=('input_scale', 'output_scale'))
  with pytest.raises(ValueError) as error:
    mkor_optax.restore_state(raw, opt.init(params))
  message = str(error.value)
  version = mkor_optax.__version__
  assert message.splitlines()[0] == 'the checkpoint does not match opt.init(params):'
  assert f'earlier release of mkor_optax than this one ({version})' in message.splitlines()[-1]
  assert 'CHANGELOG.md' in message.splitlines()[-1]
  assert re.search(r"0/input_scale/Dense_0: missing .*'input_scale' was added in 0\.2\.0",
                   message)
  assert ("0/input_side/Dense_0: missing from the checkpoint (releases before 0.2.0 called it "
          "by another name") in message


@pytest.mark.parametrize('name, renames, drop', [
    ('kfac', None, ()),
    ('eva', {'input_side': 'a', 'output_side': 'g'}, ()),
    ('mkor_h', None, ('finite_count',)),
])
def test_other_0_1_0_states_are_refused_naming_the_release(name, renames, drop):
  params = params_with_a_wide_layer()
  opt = getattr(mkor_optax, name)(1e-2)
  raw = as_restored(opt.init(params))
  if name == 'kfac':  # a_cov, a_inv, g_cov, g_inv: {layer: array}
    sides = {s: raw[0].pop(f'{s}_side') for s in ('input', 'output')}
    for side, letter in (('input', 'a'), ('output', 'g')):
      for part in ('cov', 'inv'):
        raw[0][f'{letter}_{part}'] = {l: v[part] for l, v in sides[side].items()}
  else:
    raw[0] = as_0_1_0(raw[0], renames or {}, drop)
  with pytest.raises(ValueError, match=r'earlier release of mkor_optax than this one') as error:
    mkor_optax.restore_state(raw, opt.init(params))
  old = {'kfac': "'a_cov' is what releases before 0.2.0 called",
         'eva': "'a' is what releases before 0.2.0 called 'input_side'",
         'mkor_h': "'finite_count' was added in 0.2.0"}[name]
  assert old in str(error.value)


def test_a_setting_of_this_release_is_not_blamed_on_an_earlier_one():
  params = params_with_a_wide_layer()
  raw = as_restored(mkor_optax.mkor(1e-2).init(params))
  with pytest.raises(ValueError, match='another low_rank setting') as error:
    mkor_optax.restore_state(raw, mkor_optax.mkor(1e-2, low_rank=None).init(params))
  assert 'earlier release of mkor_optax' not in str(error.value)
  acc = mkor_optax.MultiSteps(mkor_optax.mkor(1e-2), 2)
  raw = as_restored(acc.init(params))
  del raw['acc_counts']
  with pytest.raises(ValueError, match=r"'acc_counts' was added in 0\.2\.0"):
    mkor_optax.restore_state(raw, acc.init(params))


def test_the_changelog_carries_a_0_1_0_mkor_checkpoint_across():
  """The CHANGELOG's recipe, run as printed, on MKOR states of 0.1.0's first structure."""
  code = re.search(r'```python\n(def carry_mkor_0_1_0.*?)```', CHANGELOG, re.S).group(1)
  scope = {'mkor_optax': mkor_optax}
  exec(code, scope)  # noqa: S102 (the CHANGELOG's own code)
  params = params_with_a_wide_layer()
  opt = mkor_optax.mkor(1e-2, low_rank=None)
  state = opt.init(params)
  state = (state[0]._replace(count=jnp.asarray(7, jnp.int32),
                             input_side=jax.tree.map(lambda x: 2 * x, state[0].input_side)),
           *state[1:])
  raw = as_restored(state)
  raw[0] = as_0_1_0(raw[0], {'input_side': 'r_inv', 'output_side': 'l_inv'},
                    drop=('input_scale', 'output_scale'))
  carried = scope['carry_mkor_0_1_0'](raw, opt.init(params))
  assert jax.tree.structure(carried) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, carried, state)


def test_the_changelog_names_every_field_restore_state_knows():
  from mkor_optax import checkpoint
  for field in [*checkpoint.ADDED_FIELDS, *checkpoint.RENAMED_FIELDS]:
    assert f'`{field}`' in CHANGELOG, field
