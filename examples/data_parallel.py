"""Data-parallel and model-parallel MKOR on 4 fake CPU devices:

  --mode pmap         jax.pmap; gradients pmean-ed by hand, MKOR's a/g by axis_name
  --mode shard_map    jax.shard_map over a 1-D mesh; the loss is pmean-ed
  --mode distributed  the shard_map step across two processes on localhost
                      (jax.distributed: JAX's multi-host runtime), 2 devices each
  --mode sharded      jax.jit with kernels split over a ('model',) mesh: MKOR's
                      factor state is split over the devices too (not replicated)
  --mode distributed-sharded   the sharded step across two processes, 2 devices each

Each mode checks that it matches the single-device full-batch run. The
steps use MKOR's batch-mean statistics (kind=mkor_optax.RANK1), with which
every mode equals one device to rounding. Sketched statistics are
estimates, so the shard_map and sharded modes (and their jax.distributed
runs) also check that the mean outer product of 1024 sketches formed in the
capture (Sketch(1024)) of one global batch, each device sketching its own
rows, equals the single-device float32 covariances within 6 standard
errors, entry by entry. Run:
    python examples/data_parallel.py --mode shard_map [--steps 20] [--smoke]
A comma list (--mode distributed,distributed-sharded) runs several modes in
one go, against one single-device run (the distributed modes in one pair of
processes; they cannot be mixed with the others).
"""

import argparse
import os
import subprocess
import sys


MODES = ('pmap', 'shard_map', 'distributed', 'sharded', 'distributed-sharded')


def modes(text):
  names = text.split(',')
  unknown = [n for n in names if n not in MODES]
  if unknown:
    raise argparse.ArgumentTypeError(f'unknown mode(s) {unknown}; choose from {list(MODES)}')
  if len({n.startswith('distributed') for n in names}) > 1:
    raise argparse.ArgumentTypeError('the distributed modes run in processes of their own: '
                                     'do not mix them with the others in one --mode')
  return names


def parse():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--mode', type=modes, default=['shard_map'],
                  help=f'one of {list(MODES)}, or a comma list of them')
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--smoke', action='store_true')
  ap.add_argument('--process-id', type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument('--port', type=int, default=None, help=argparse.SUPPRESS)
  return ap.parse_args()


ARGS = parse()
LOCAL_DEVICES = 2 if ARGS.process_id is not None else 4
_OTHER_FLAGS = [f for f in os.environ.get('XLA_FLAGS', '').split()
                if not f.startswith('--xla_force_host_platform_device_count')]  # kept
os.environ['XLA_FLAGS'] = ' '.join(_OTHER_FLAGS + [
    f'--xla_force_host_platform_device_count={LOCAL_DEVICES}'])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)

if ARGS.process_id is not None:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'localhost:{ARGS.port}', num_processes=2,
                             process_id=ARGS.process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import mkor_optax  # noqa: E402
from common import MLP, batches, classification_loss, load_digits  # noqa: E402

BATCH = 64
MODEL = MLP((64, 64))
LOSS = classification_loss(MODEL)


KIND = mkor_optax.RANK1  # exact equality with one device (see the docstring)
SKETCHES = mkor_optax.Sketch(1024)


def make_opt(**kw):
  # low_rank_min_dim=0: this small MLP's sides (> 16) get low-rank factors too,
  # so the sharded mode splits both kinds of factor
  return mkor_optax.mkor(1e-2, low_rank_min_dim=0, **kw)


def single_device(params, data, steps):
  opt = make_opt()

  @jax.jit
  def step(p, s, x, y):
    loss, g, st = mkor_optax.value_and_grad(LOSS, kind=KIND)(p, x, y)
    u, s = opt.update(g, s, p, stats=st)
    return optax.apply_updates(p, u), s, loss

  s = opt.init(params)
  for x, y in data[:steps]:
    params, s, loss = step(params, s, x, y)
  return params, float(loss)


def run_pmap(params, data, steps):
  opt = make_opt(axis_name='batch')

  def step(p, s, x, y):
    loss, g, st = mkor_optax.value_and_grad(LOSS, kind=KIND)(p, x, y)
    g = jax.lax.pmean(g, 'batch')                      # as in any pmap loop
    u, s = opt.update(g, s, p, stats=st)               # MKOR pmeans a and g itself
    return optax.apply_updates(p, u), s, jax.lax.pmean(loss, 'batch')

  step = jax.pmap(step, axis_name='batch')
  n = jax.local_device_count()
  rep = lambda t: jax.tree.map(lambda v: jnp.stack([v] * n), t)
  p, s = rep(params), rep(opt.init(params))
  for x, y in data[:steps]:
    p, s, loss = step(p, s, x.reshape(n, -1, *x.shape[1:]), y.reshape(n, -1))
  return jax.tree.map(lambda v: v[0], p), float(loss[0]), None


def shard_map_step(mesh):
  opt = make_opt(axis_name='batch')

  def body(p, s, x, y):
    global_loss = lambda p, x, y: jax.lax.pmean(LOSS(p, x, y), 'batch')
    loss, g, st = mkor_optax.value_and_grad(global_loss, kind=KIND)(p, x, y)  # grads global
    u, s = opt.update(g, s, p, stats=st)
    return optax.apply_updates(p, u), s, loss

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
                               out_specs=(P(), P(), P())))
  return opt, step


def sketch_deviation(stats, params, x, y):
  """The largest deviation, in standard errors, of the mean outer products of
  ``stats``' sketches from the single-device covariances, over every entry of
  every layer (entries whose covariance terms are all zero, such as a pixel
  that is zero in every image, must match exactly: infinity otherwise). For
  random signs ``Var(v_p v_q) <= C_pp C_qq + C_pq^2``."""
  cov = jax.jit(mkor_optax.value_and_grad(LOSS, kind=mkor_optax.COVARIANCE))(params, x, y)[2]
  worst = 0.0
  for name, c in cov.items():
    for sk, want in ((stats[name]['a_sketches'], c['A']), (stats[name]['g_sketches'], c['G'])):
      v, want = np.asarray(sk, np.float64), np.asarray(want, np.float64)
      got = np.einsum('ki,kj->ij', v, v) / v.shape[0]
      diag = np.diag(want)
      err = np.sqrt((diag[:, None] * diag[None, :] + want ** 2) / v.shape[0])
      off = np.abs(got - want)
      worst = max(worst, float(np.max(np.where(err > 0, off / np.where(err > 0, err, 1.0),
                                                np.where(off > 1e-7, np.inf, 0.0)))))
  return worst


def run_shard_map(params, data, steps):
  mesh = jax.make_mesh((jax.device_count(),), ('batch',))
  opt, step = shard_map_step(mesh)
  sharded = NamedSharding(mesh, P('batch'))
  if jax.process_count() > 1:  # each process holds its half of every global batch
    half = BATCH // jax.process_count()
    lo = jax.process_index() * half
    put = lambda a: jax.make_array_from_process_local_data(sharded, a[lo:lo + half], a.shape)
  else:
    put = lambda a: jax.device_put(a, sharded)
  p, s = params, opt.init(params)
  for x, y in data[:steps]:
    p, s, loss = step(p, s, put(x), put(y))
  # sketches of one global batch, each device its own rows and signs
  global_loss = lambda p, x, y: jax.lax.pmean(LOSS(p, x, y), 'batch')
  sketch = jax.jit(jax.shard_map(
      lambda p, x, y: mkor_optax.value_and_grad(global_loss, kind=SKETCHES)(p, x, y)[2],
      mesh=mesh, in_specs=(P(), P('batch'), P('batch')), out_specs=P()))
  x, y = data[0]
  deviation = sketch_deviation(sketch(params, put(x), put(y)), params, x, y)
  return jax.tree.map(np.asarray, jax.device_get(p)), float(loss), deviation


def run_sharded(params, data, steps):
  """Model parallel: every kernel split on its output axis over all devices
  (of both processes under jax.distributed); the batch is replicated."""
  mesh = jax.make_mesh((jax.device_count(),), ('model',), axis_types=(jax.sharding.AxisType.Auto,))
  spec = lambda v: P(None, 'model') if v.ndim == 2 and v.shape[1] % jax.device_count() == 0 else P()
  glob = lambda v, sp: jax.make_array_from_callback(v.shape, NamedSharding(mesh, sp),
                                                    lambda idx: np.asarray(v)[idx])
  p = jax.tree.map(lambda v: glob(v, spec(v)), params)
  opt = make_opt()
  s = opt.init(p)  # sees the partitioned kernels: the factors are split too

  @jax.jit
  def step(p, s, x, y):
    loss, g, st = mkor_optax.value_and_grad(LOSS, kind=KIND)(p, x, y)
    u, s = opt.update(g, s, p, stats=st)
    return optax.apply_updates(p, u), s, loss

  for x, y in data[:steps]:
    p, s, loss = step(p, s, glob(x, P()), glob(y, P()))
  from mkor_optax.sharding import bytes_per_device
  mkor_state = s[0]
  per_device = bytes_per_device((mkor_state.input_side, mkor_state.output_side))
  total = sum(np.prod(v.shape) * v.dtype.itemsize
              for v in jax.tree.leaves((mkor_state.input_side, mkor_state.output_side)))
  print(f'factor state: {total} bytes in all, at most {max(per_device.values())} on one of this '
        f"process's {len(per_device)} devices")
  if max(per_device.values()) > 0.5 * total:
    sys.exit('the factor state is not split over the devices')
  replicate = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
  # sketches of one batch with the kernels split over the devices
  x, y = data[0]
  sketches = jax.jit(mkor_optax.value_and_grad(LOSS, kind=SKETCHES))(
      jax.tree.map(lambda v: glob(v, spec(v)), params), glob(x, P()), glob(y, P()))[2]
  deviation = sketch_deviation(jax.device_get(replicate(sketches)), params, x, y)
  return jax.tree.map(np.asarray, replicate(p)), float(loss), deviation


def launch_two_processes(mode, steps, smoke):
  import socket
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  cmd = [sys.executable, __file__, '--mode', mode, '--steps', str(steps), '--port', str(port)]
  cmd += ['--smoke'] if smoke else []
  # Each process writes to a file of its own, printed whole once both end:
  # two processes sharing one stdout can interleave within a line.
  import tempfile
  logs = [tempfile.TemporaryFile('w+') for _ in range(2)]
  procs = [subprocess.Popen(cmd + ['--process-id', str(i)], stdout=log, stderr=subprocess.STDOUT,
                            text=True) for i, log in enumerate(logs)]
  codes = [p.wait(timeout=600) for p in procs]
  for i, log in enumerate(logs):
    log.seek(0)
    print(f'--- process {i} (exit code {codes[i]}) ---\n{log.read()}', end='', flush=True)
    log.close()
  if any(codes):
    sys.exit(f'a process failed: exit codes {codes}')


def main():
  steps = 3 if ARGS.smoke else ARGS.steps
  if ARGS.mode[0].startswith('distributed') and ARGS.process_id is None:
    launch_two_processes(','.join(ARGS.mode), steps, ARGS.smoke)
    return
  (x, y), _ = load_digits()
  it = batches(x, y, BATCH, seed=0)
  data = [next(it) for _ in range(steps)]
  params = MODEL.init(jax.random.PRNGKey(0), x[:2])['params']
  want, want_loss = single_device(params, data, steps)
  for mode in ARGS.mode:
    run = {'pmap': run_pmap, 'sharded': run_sharded,
           'distributed-sharded': run_sharded}.get(mode, run_shard_map)
    got, loss, deviation = run(params, data, steps)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    who = f'process {jax.process_index()}/{jax.process_count()}, ' if jax.process_count() > 1 else ''
    print(f'{mode}: {who}{jax.device_count()} devices, {steps} steps, loss {loss:.4f} '
          f'(single device {want_loss:.4f}), max |param difference| {diff:.2e}')
    if diff > 1e-4:
      sys.exit(f'{mode}: data-parallel run does not match the single-device run')
    if deviation is not None:
      print(f'{mode}: {SKETCHES.k} sketches vs the single-device covariances: largest '
            f'deviation {deviation:.2f} standard errors (limit 6)')
      if deviation > 6.0:
        sys.exit(f'{mode}: the sketches do not sketch the single-device covariances')


if __name__ == '__main__':
  main()
