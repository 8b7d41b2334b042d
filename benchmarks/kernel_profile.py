"""Where a train step's time and compile go, kernel by kernel: default MKOR
beside LAMB, each XLA kernel attributed to the source line that made it.

The step (``value_and_grad`` with the capture, ``update``, ``apply_updates``)
is jitted as in ``step_cost.py``. Per step: ``--steps`` steps run under
``jax.profiler``, with XLA:CPU's per-kernel trace events on; each event is
matched, by its instruction name, to the compiled HLO's stack frames, and
its time summed per group (a module of this library, of optax or of the
model). Compile: the kernels (fusions, dots, copies, custom calls) of the
compiled program, those of the refresh's ``lax.cond`` branches included,
counted per group; XLA:CPU's compile time grows with that count (each kernel
is emitted and compiled by LLVM on its own).

Profiled times carry the tracer's own cost per kernel and are larger than
``step_cost.py``'s; read them as shares, not as milliseconds.

    python benchmarks/kernel_profile.py [--task autoencoder|cnn|...|256] [--steps 200] [--by file|function|line] [--method mkor|adaptive] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

# per-kernel trace events of XLA:CPU (read when the backend starts)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true').strip()

import jax  # noqa: E402
import optax  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'examples'))
import mkor_optax  # noqa: E402
from common import make_step  # noqa: E402
from step_cost import case  # noqa: E402

NOT_KERNELS = ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant')


def _table(hlo: str, name: str) -> list:
  block = hlo.split('\n' + name + '\n')
  return re.findall(r'^(\d+) (.*)$', block[1].split('\n\n')[0], re.M) if len(block) > 1 else []


def source_of(hlo: str, by: str) -> dict:
  """``{instruction name: group}`` from the compiled HLO's stack frames."""
  # package/module.py (optax's numerics.py is not this library's)
  files = {int(i): '/'.join(v.strip('"').split('/')[-2:]) for i, v in _table(hlo, 'FileNames')}
  funcs = {int(i): v.strip('"') for i, v in _table(hlo, 'FunctionNames')}
  where = {}
  for i, v in _table(hlo, 'FileLocations'):
    d = dict(re.findall(r'(\w+)=(\d+)', v))
    f, fn = files[int(d['file_name_id'])], funcs[int(d['function_name_id'])]
    where[int(i)] = {'file': f, 'function': f'{f}:{fn}', 'line': f"{f}:{fn}:{d['line']}"}[by]
  frames = {int(i): int(dict(re.findall(r'(\w+)=(\d+)', v))['file_location_id'])
            for i, v in _table(hlo, 'StackFrames')}
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?stack_frame_id=(\d+)', hlo, re.M):
    out[m.group(1)] = where[frames[int(m.group(2))]]
  return out


def compiled_kernels(hlo: str, groups: dict) -> collections.Counter:
  """Kernels per group in the entry computation and the conditional branches
  (the instructions the runtime launches; fused computations are inside them)."""
  comps = dict(re.findall(r'^(?:ENTRY )?%([\w.\-]+) \([^\n]*\{\n(.*?)\n\}', hlo, re.M | re.S))
  entry = re.search(r'^ENTRY %([\w.\-]+)', hlo, re.M).group(1)
  todo, seen, count = [entry], set(), collections.Counter()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name].splitlines():
      if ' conditional(' in line:
        todo += re.findall(r'%([\w.\-]+)', line.split('branch_computations=')[1].split('}')[0])
        continue
      m = re.search(r'%([\w.\-]+) = \S+ ([\w\-]+)\(', line)
      if not m or m.group(2) in NOT_KERNELS:
        continue
      count[groups.get(m.group(1), 'unattributed (XLA)')] += 1
  return count


def profile(step, carry, batch, steps: int, groups: dict) -> tuple:
  """(µs per step per group, kernel launches per step per group)."""
  for _ in range(10):
    carry = step(*carry, *batch)[:2]
  jax.block_until_ready(carry)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(steps):
      carry = jax.block_until_ready(step(*carry, *batch)[:2])
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0])
  time_us, launches = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if 'XLA' not in line.name:
        continue
      for ev in line.events:
        if ev.name.startswith(('ThunkExecutor', 'end:')) or '::' in ev.name:
          continue
        g = groups.get(ev.name, 'unattributed (XLA)')
        time_us[g] += ev.duration_ns / 1e3 / steps
        launches[g] += 1 / steps
  return time_us, launches


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument('--task', default='autoencoder', help='a compare.py task, or a width (d-d-d MLP)')
  ap.add_argument('--steps', type=int, default=200)
  ap.add_argument('--by', default='file', choices=('file', 'function', 'line'))
  ap.add_argument('--method', default='mkor', choices=('mkor', 'adaptive'),
                  help="'adaptive': the adaptive race's adaptive_mkor step (autoencoder, cnn) in MKOR's place")
  ap.add_argument('--top', type=int, default=25)
  ap.add_argument('--out', default=None, help='append the table (markdown) to this file')
  args = ap.parse_args(argv)
  params, batch, loss_fn = case(args.task)  # a width: a d-d-d MLP, batch 256 (step_cost.py's)
  rows = {}
  for name, opt, kind in (('LAMB', optax.lamb(1e-2), None),
                          ('MKOR', mkor_optax.mkor(1e-2, weight_decay=0.0), mkor_optax.SKETCH)):
    inputs = batch
    if name == 'MKOR' and args.method == 'adaptive':  # the adaptive race's step, a fixed key
      from adaptive_race import adaptive_step, tasks
      model, loss_of_outputs, fisher, _ = tasks()[args.task]
      opt = mkor_optax.adaptive_mkor()
      step = adaptive_step(model, opt, mkor_optax.SKETCH, loss_of_outputs, fisher)
      inputs = tuple(batch) + (jax.random.PRNGKey(0),)
    else:
      step = make_step(loss_fn, opt, kind)
    state = opt.init(params)
    hlo = step.lower(params, state, *inputs).compile().as_text()
    groups = source_of(hlo, args.by)
    rows[name] = (*profile(step, (params, state), inputs, args.steps, groups), compiled_kernels(hlo, groups))
  t, n, c = rows['MKOR']
  lt, ln, lc = rows['LAMB']
  head = (f'{args.task}: kernel time {sum(t.values()):.0f} µs per step (MKOR) against '
          f'{sum(lt.values()):.0f} (LAMB), both threads summed; kernels compiled {sum(c.values())} '
          f'against {sum(lc.values())}.')
  lines = [head, '', f'| {args.by} | µs per step | LAMB | launches per step | LAMB | kernels compiled | LAMB |',
           '|---|---|---|---|---|---|---|']
  for g in sorted(set(t) | set(c), key=lambda g: -t.get(g, 0.0))[:args.top]:
    lines.append(f'| {g} | {t.get(g, 0):.1f} | {lt.get(g, 0):.1f} | {n.get(g, 0):.1f} | {ln.get(g, 0):.1f} '
                 f'| {c.get(g, 0)} | {lc.get(g, 0)} |')
  print('\n'.join(lines))
  if args.out:
    with open(args.out, 'a') as f:
      f.write('\n'.join(lines) + '\n\n')


if __name__ == '__main__':
  main()
