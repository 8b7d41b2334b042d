"""Every measured number the documentation prints, read from ``results/``.

The benchmark scripts write their tables to ``results/``. The pages never type
a measured number: they include those tables, or name a number defined here
(``{{ name }}`` on a docs page, a generated block in the README). The build
reads this module (``docs/conf.py``), and ``tests/test_numbers.py`` fails
when a page types a measurement by hand or when the README's generated blocks
differ from what their sources give now.

    python docs/measured.py            # print every name and its value
    python docs/measured.py --readme   # rewrite the README's generated blocks
"""

from __future__ import annotations

import functools
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'results'


# --- reading the results' markdown tables ------------------------------------

def _cells(line):
  return [c.strip() for c in line.strip().strip('|').split('|')]


@functools.lru_cache(maxsize=None)
def tables(path):
  """``{section: [row dicts]}`` of a results markdown file: a section is the
  text of the ``#`` heading or ``**bold**`` line above a table ('' before any)."""
  out, section, lines = {}, '', (RESULTS / path).read_text().splitlines()
  i = 0
  while i < len(lines):
    line = lines[i].strip()
    if line.startswith('#'):
      section = line.lstrip('#').strip()
    elif re.fullmatch(r'\*\*[^*]+\*\*.*', line):
      section = re.match(r'\*\*([^*]+)\*\*', line).group(1).strip()
    elif line.startswith('|') and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set('|-: '):
      header = _cells(line)
      rows, i = [], i + 2
      while i < len(lines) and lines[i].strip().startswith('|'):
        rows.append(dict(zip(header, _cells(lines[i]))))
        i += 1
      out.setdefault(section, []).extend(rows)
      continue
    i += 1
  return out


def _strip(text):
  return re.sub(r'\*\*|`', '', text).strip()


def cell(path, row, col, section=None, part=None):
  """The cell of ``results/<path>`` at the row whose first column is ``row``
  and the column ``col`` (``section``: the heading the table sits under, by
  its start). ``part='ratio'`` keeps the ``(...)`` of a ``"259 (0.57)"`` cell,
  ``part='value'`` what comes before it."""
  found = tables(path)
  sections = [s for s in found if section is None or s.startswith(section)]
  for s in sections:
    for r in found[s]:
      first = _strip(next(iter(r.values())))
      if first == row:
        if col not in r:
          raise KeyError(f'{path} [{s}]: no column {col!r} (has {list(r)})')
        text = _strip(r[col])
        if part == 'ratio':
          m = re.search(r'\(([^)]*)\)', text)
          text = m.group(1) if m else text
        elif part == 'value':
          text = text.split('(')[0].strip()
        return text
  raise KeyError(f'{path}: no row {row!r} under {section!r} (sections {sections})')


def span(values, suffix=''):
  """``'1.27-1.70'``: the range of some cells, as printed in their source."""
  nums = sorted(values, key=float)
  lo, hi = nums[0], nums[-1]
  return f'{lo}{suffix}' if lo == hi else f'{lo}-{hi}{suffix}'


# --- the named numbers -------------------------------------------------------

TASKS = {'autoencoder': 'autoencoder', 'cnn': 'CNN', 'resnet': 'ResNet + BatchNorm',
         'bert': 'masked-LM', 'mlp64': 'MLP autoencoder (width <= 64)'}
STUDY = 'seeds/scale_free_summary.md'
COST = 'bench/step_cost.md'
TTT = 'time_to_target/time_to_target.md'
COMPARE = 'compare/compare.md'


def _study(config, task, part='ratio'):
  raw = cell(STUDY, config, TASKS[task])
  if not raw:
    return 'not run'
  return 'not reached' if raw.startswith('-') else cell(STUDY, config, TASKS[task], part=part)


def _cost(task, config='mkor', what='per step', section='Tasks'):
  """A ratio to LAMB of the cost table (``what``: 'per step' or 'compile')."""
  title = {'Tasks': 'Tasks', 'Widths': 'Widths (d-d-d MLP, batch 256)'}[section]
  return cell(COST, task, config, section=f'{title}, {what}')


def _ttt(task, optimizer, col='median steps (/ LAMB)', part='ratio'):
  return cell(TTT, optimizer, col, section=task, part=part)


def _compare(task, optimizer, col='steps to target (/ LAMB)', part='ratio'):
  text = cell(COMPARE, optimizer, col, section=task, part=part)
  return 'not reached' if text == '-' else text


def _wide(row, col):
  return cell('width_sweep/width_sweep.md', row, col)


def _seeds(path, row, section=None, col='steps to target, per seed'):
  """The range over the seeds of a ``"452 / 435 / 463"`` cell."""
  per_seed = cell(path, row, col, section=section).split(' / ')
  return 'not reached' if '-' in per_seed else span(per_seed)


NUMBERS = {
    # steps to LAMB's loss, 3-seed medians, as ratios to LAMB (the scale-free study)
    **{f'steps_mkor_{t}': (lambda t=t: _study('MKOR, damping 1, inv_freq 7 (default)', t)) for t in TASKS},
    **{f'steps_kfac_{t}': (lambda t=t: _study('K-FAC, relative 0.1 (default)', t)) for t in TASKS},
    **{f'steps_muon_{t}': (lambda t=t: _study('Muon', t)) for t in TASKS},
    **{f'steps_adamw_{t}': (lambda t=t: _study('AdamW', t)) for t in TASKS},
    **{f'steps_mkor_025_{t}': (lambda t=t: _study('MKOR, damping 0.25', t)) for t in TASKS},
    **{f'steps_mkor_mean_{t}': (lambda t=t: _study('MKOR, mean statistics, damping 0.25', t))
       for t in TASKS},
    **{f'steps_mkor_010_{t}': (lambda t=t: _study('MKOR, absolute (0.1.0 default)', t)) for t in TASKS},
    # cost per step and per compile against LAMB (step_cost.py)
    **{f'cost_mkor_{t}': (lambda t=t: _cost(t)) for t in TASKS},
    **{f'cost_mkor_loud_{t}': (lambda t=t: _cost(t, 'mkor, jit warnings')) for t in TASKS},
    **{f'cost_kfac_{t}': (lambda t=t: _cost(t, 'kfac')) for t in TASKS},
    **{f'cost_sonew_{t}': (lambda t=t: _cost(t, 'sonew')) for t in TASKS},
    'cost_mkor_tasks': lambda: span([_cost(t) for t in ('autoencoder', 'cnn', 'resnet', 'bert')]),
    'cost_mkor_loud_tasks': lambda: span([_cost(t, 'mkor, jit warnings')
                                          for t in ('autoencoder', 'cnn', 'resnet', 'bert')]),
    'cost_mkor_wide': lambda: span([_cost(w, section='Widths') for w in ('1024', '4096')]),
    'cost_mkor_256': lambda: _cost('256', section='Widths'),
    'cost_kfac_all': lambda: span([_cost(t, 'kfac') for t in TASKS]
                                  + [_cost(w, 'kfac', section='Widths') for w in ('256', '1024', '4096')]),
    'compile_mkor_all': lambda: span([_cost(t, what='compile') for t in TASKS]
                                     + [_cost(w, what='compile', section='Widths')
                                        for w in ('256', '1024', '4096')]),
    'lamb_ms_bert': lambda: _cost('bert', 'LAMB ms/step'),
    # 0.1.0's defaults: steps and seconds to target over 3 seeds (time_to_target.py)
    **{f'ttt_{o}_{t}_{w}': (lambda t=t, row=row, col=col: _ttt(t, row, col))
       for t in ('autoencoder', 'cnn', 'resnet', 'bert')
       for o, row in (('lamb', 'LAMB'), ('adamw', 'AdamW'), ('muon', 'Muon'),
                      ('mkor', 'MKOR (default: Sketch(4))'),
                      ('mkor_mean', 'MKOR, mean statistics (RANK1)'), ('kfac', 'our K-FAC'))
       for w, col in (('steps', 'median steps (/ LAMB)'), ('seconds', 'median seconds (/ LAMB)'))},
    # the one-process comparison of every optimizer, seed 0 (compare.py)
    **{f'compare_{o}_{t}': (lambda t=t, o=o: _compare(t, o))
       for t in ('autoencoder', 'bert', 'cnn')
       for o in ('adamw', 'muon', 'psgd_kron', 'mkor', 'mkor_adam', 'mkor_muon', 'mkor_h', 'kfac',
                 'eva', 'sonew')},
    # wide layers: rank-8 low-rank inverses (width_sweep.py)
    'wide_rank8': lambda: span([_wide(f'd-d-d MLP d={d} batch 256', 'mkor rank 8: step / LAMB (state / params)',
                                      ).split(' ')[0] for d in (256, 512, 1024, 2048, 4096)]),
    'wide_vae_rank8': lambda: _wide('VAE 784-256-32-256-784 batch 32',
                                    'mkor rank 8: step / LAMB (state / params)').split(' ')[0],
    'wide_rank8_state': lambda: span([_wide(f'd-d-d MLP d={d} batch 256',
                                            'mkor rank 8: step / LAMB (state / params)')
                                      .split('(')[1].rstrip(')') for d in (256, 512, 1024, 2048, 4096)]),
    'wide_vae_lamb_ms': lambda: _wide('VAE 784-256-32-256-784 batch 32', 'LAMB ms/step'),
    # the adaptive (quadratic-model) step on the digits autoencoder, 3 seeds (adaptive_step.py);
    # per-seed steps to LAMB's loss as a range; cost per step from the quiet run with 0.1.0's K-FAC
    'adaptive_lamb_steps': lambda: _seeds('adaptive_step/adaptive_step_scale_free.md', 'lamb (lr 0.01)'),
    'adaptive_kfac_steps': lambda: _seeds('adaptive_step/adaptive_step_scale_free.md',
                                          'kfac relative 0.1 + quadratic step'),
    'adaptive_mkor_steps': lambda: _seeds('adaptive_step/adaptive_step_scale_free.md',
                                          'mkor sketch damping 0.25 + quadratic step'),
    'adaptive_kfac_cost': lambda: cell('adaptive_step/adaptive_step.md', 'kfac + quadratic step',
                                       'ms/step / LAMB'),
    'adaptive_kfac_lamb_cost': lambda: cell('adaptive_step/adaptive_step.md', 'kfac + lamb (lr 0.01)',
                                            'ms/step / LAMB'),
    # MKOR's default (damping 0.25, LAMB after it) on the autoencoder, per-seed steps (seeds.py)
    'seeds_mkor_autoencoder_steps': lambda: _seeds('seeds/scale_free_mlp64_autoencoder.md',
                                                   'mkor damping 0.25', section='autoencoder',
                                                   col='steps per seed'),
}


def value(name):
  return NUMBERS[name]()


def substitutions():
  """Every name's value, for MyST's ``{{ name }}`` substitutions."""
  return {name: value(name) for name in NUMBERS}


# --- the README's generated blocks -------------------------------------------

def readme_measured():
  """The README's table: steps to LAMB's loss (study) and cost per step."""
  rows = [('**MKOR** (`mkor(lr)`)', 'steps_mkor', 'cost_mkor'),
          ('K-FAC (`kfac(lr)`)', 'steps_kfac', 'cost_kfac'),
          ('Muon (`optax.contrib.muon`)', 'steps_muon', None),
          ('AdamW (`optax.adamw`)', 'steps_adamw', None)]
  head = ('| optimizer | ' + ' | '.join(TASKS.values()) + ' |\n'
          + '|---' * (len(TASKS) + 1) + '|\n')
  out = ['Steps to reach LAMB\'s final training loss, as ratios to LAMB\'s steps '
         '(medians over 3 seeds; lower is better):', '', head.rstrip('\n')]
  for label, steps, _ in rows:
    vals = [value(f'{steps}_{t}') if f'{steps}_{t}' in NUMBERS else 'not run' for t in TASKS]
    out.append(f'| {label} | ' + ' | '.join(vals) + ' |')
  out += ['', 'Time per step, as ratios to LAMB\'s (the same process):', '',
          head.rstrip('\n')]
  for label, _, cost in rows:
    if cost:
      out.append(f'| {label} | ' + ' | '.join(value(f'{cost}_{t}') for t in TASKS) + ' |')
  return '\n'.join(out)


def _demo(row, col):
  return float(cell(DEMO, row, col))


def _demo_ratio(col):
  return f"{_demo('MKOR+LAMB', col) / _demo('LAMB', col):.2f}"


DEMO = 'demo/demo.md'
NUMBERS.update({
    'demo_steps': lambda: _demo_ratio('steps to target'),
    'demo_seconds': lambda: _demo_ratio('seconds to target'),
    'demo_step_cost': lambda: _demo_ratio('ms/step'),
    # the same cost timed in blocks, as step_cost.py times it (in the demo's run, and
    # step_cost.py's own row for the demo's model)
    'demo_step_cost_blocks': lambda: _demo_ratio('ms/step, in blocks'),
    'cost_mkor_demo': lambda: _cost('demo'),
})


def readme_demo():
  """What ``make demo`` printed on this project's machine."""
  return (f"On this project's 2-core CPU, `make demo` printed: MKOR+LAMB reached LAMB's final "
          f"loss in {value('demo_steps')}x LAMB's steps and {value('demo_seconds')}x its seconds, "
          f"each step costing {value('demo_step_cost')}x a LAMB step in that run (which waits for "
          f"every step's loss) and {value('demo_step_cost_blocks')}x timed in blocks as "
          f"`benchmarks/step_cost.py` times it (its `demo` row, a separate run: "
          f"{value('cost_mkor_demo')}x).")


RACE = 'adaptive_step/adaptive_race_autoencoder.md'
# the race's rows name their statistics: the recipe's default (adaptive_inputs
# with fisher=) is 8 sketches, the row 'adaptive_mkor Sketch(8)'; the row
# 'adaptive_mkor' passes SKETCH (4 sketches, the default before)
DEFAULT_ROW, QUARTER_ROW = 'adaptive_mkor Sketch(8)', 'adaptive_mkor Sketch(8), curvature on 1/4'
ratio_to_kfac_jax = lambda row: (
    f"{float(cell(RACE, row, 'steps (/ LAMB)', part='value')) / float(cell(RACE, 'kfac-jax', 'steps (/ LAMB)', part='value')):.2f}")
NUMBERS.update({
    # the adaptive recipe against kfac-jax and the rest (adaptive_race.py), medians over 3 seeds
    'race_mkor_steps': lambda: cell(RACE, DEFAULT_ROW, 'steps (/ LAMB)', part='value'),
    'race_mkor_steps_vs_kfac_jax': lambda: ratio_to_kfac_jax(DEFAULT_ROW),
    'race_mkor_seconds': lambda: cell(RACE, DEFAULT_ROW, 'seconds (/ LAMB)', part='ratio'),
    'race_mkor_step_cost': lambda: cell(RACE, DEFAULT_ROW, 'ms/step (/ LAMB)', part='ratio'),
    'race_kfac_jax_steps': lambda: cell(RACE, 'kfac-jax', 'steps (/ LAMB)', part='value'),
    'race_kfac_jax_seconds': lambda: cell(RACE, 'kfac-jax', 'seconds (/ LAMB)', part='ratio'),
    'race_muon_seconds': lambda: cell(RACE, 'muon', 'seconds (/ LAMB)', part='ratio'),
    'race_adamw_seconds': lambda: cell(RACE, 'adamw', 'seconds (/ LAMB)', part='ratio'),
    'race_lamb_steps': lambda: cell(RACE, 'lamb', 'steps (/ LAMB)', part='value'),
    # 4 sketches per side (kind=SKETCH, the default before)
    'race_s4_steps': lambda: cell(RACE, 'adaptive_mkor', 'steps (/ LAMB)', part='value'),
    'race_s4_steps_vs_kfac_jax': lambda: ratio_to_kfac_jax('adaptive_mkor'),
    'race_s4_seconds': lambda: cell(RACE, 'adaptive_mkor', 'seconds (/ LAMB)', part='ratio'),
    'race_s4_step_cost': lambda: cell(RACE, 'adaptive_mkor', 'ms/step (/ LAMB)', part='ratio'),
    # the curvature products on the batch's first quarter (curvature_on), default statistics
    'race_quarter_steps': lambda: cell(RACE, QUARTER_ROW, 'steps (/ LAMB)', part='value'),
    'race_quarter_steps_vs_kfac_jax': lambda: ratio_to_kfac_jax(QUARTER_ROW),
    'race_quarter_seconds': lambda: cell(RACE, QUARTER_ROW, 'seconds (/ LAMB)', part='ratio'),
    'race_quarter_step_cost': lambda: cell(RACE, QUARTER_ROW, 'ms/step (/ LAMB)', part='ratio'),
})

RACE_CNN = 'adaptive_step/adaptive_race_cnn_sketch8.md'
NUMBERS.update({
    # the CNN, 3 seeds: 8 sketches (the default) against 4
    'cnn_race_mkor_steps': lambda: cell(RACE_CNN, DEFAULT_ROW, 'steps (/ LAMB)', part='value'),
    'cnn_race_mkor_seconds': lambda: cell(RACE_CNN, DEFAULT_ROW, 'seconds (/ LAMB)', part='ratio'),
    'cnn_race_s4_steps': lambda: cell(RACE_CNN, 'adaptive_mkor', 'steps (/ LAMB)', part='value'),
    'cnn_race_s4_seconds': lambda: cell(RACE_CNN, 'adaptive_mkor', 'seconds (/ LAMB)', part='ratio'),
    'cnn_race_adamw_seconds': lambda: cell(RACE_CNN, 'adamw', 'seconds (/ LAMB)', part='ratio'),
})

RACE_RESNET = 'adaptive_step/adaptive_race_resnet.md'
NUMBERS.update({
    # the same race on the ResNet with BatchNorm (3 seeds): rescale=True against the default
    'resnet_race_rescale_steps': lambda: cell(RACE_RESNET, 'adaptive_mkor rescale', 'steps (/ LAMB)',
                                              part='value'),
    'resnet_race_rescale_seconds': lambda: cell(RACE_RESNET, 'adaptive_mkor rescale',
                                                'seconds (/ LAMB)', part='ratio'),
    'resnet_race_lamb_steps': lambda: cell(RACE_RESNET, 'lamb', 'steps (/ LAMB)', part='value'),
    'resnet_race_adamw_seconds': lambda: cell(RACE_RESNET, 'adamw', 'seconds (/ LAMB)', part='ratio'),
    'resnet_race_mkor_final': lambda: cell(RACE_RESNET, 'adaptive_mkor', 'final loss'),
    'resnet_race_lamb_final': lambda: cell(RACE_RESNET, 'lamb', 'final loss'),
})


def readme_adaptive():
  """The adaptive recipe's race on the autoencoder."""
  return (f"On the digits autoencoder (medians over 3 seeds, one process, 2-core CPU), "
          f"`adaptive_mkor` reached LAMB's final loss in {value('race_mkor_steps')} steps "
          f"({value('race_mkor_steps_vs_kfac_jax')}x kfac-jax's {value('race_kfac_jax_steps')}; "
          f"LAMB: {value('race_lamb_steps')}) and {value('race_mkor_seconds')}x LAMB's seconds, "
          f"each step costing {value('race_mkor_step_cost')}x a LAMB step. kfac-jax took "
          f"{value('race_kfac_jax_seconds')}x LAMB's seconds, Muon {value('race_muon_seconds')}x, "
          f"AdamW {value('race_adamw_seconds')}x. With the curvature products on a quarter of the "
          f"batch (`adaptive_inputs(..., curvature_on=...)`) it took {value('race_quarter_steps')} "
          f"steps ({value('race_quarter_steps_vs_kfac_jax')}x kfac-jax's) and "
          f"{value('race_quarter_seconds')}x LAMB's seconds.")


README_BLOCKS = {'measured': readme_measured, 'demo': readme_demo, 'adaptive': readme_adaptive}
BEGIN, END = '<!-- numbers:{} (generated by docs/measured.py --readme) -->', '<!-- /numbers -->'


def readme_block_pattern(name):
  """The block's text (group 1, ending in a newline unless empty); it stops
  at the first end marker, so one block cannot swallow the next."""
  return re.compile(re.escape(BEGIN.format(name)) + r'\n(.*?)' + re.escape(END), re.S)


def write_readme(path=ROOT / 'README.md'):
  text = path.read_text()
  for name, make in README_BLOCKS.items():
    pat = readme_block_pattern(name)
    if not pat.search(text):
      raise SystemExit(f'README.md has no block {BEGIN.format(name)}')
    text = pat.sub(lambda m: f'{BEGIN.format(name)}\n{make()}\n{END}', text, count=1)
  path.write_text(text)


if __name__ == '__main__':
  if '--readme' in sys.argv:
    write_readme()
  else:
    for k, v in substitutions().items():
      print(f'{k:36s} {v}')
