"""The rank-1 refresh against dense float64 linear algebra (SPEC 1.3-1.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mkor_optax import rank1
from mkor_optax.mkor import refresh_inverse

NO_STAB = dict(zeta=0.9, epsilon=np.inf)


def ema(p, v, gamma):
  return refresh_inverse(p, v, gamma=gamma, refresh='ema', **NO_STAB)


def stabilise(p, epsilon, zeta):
  """The stabiliser alone: an 'ema' refresh with v = 0 and gamma -> 1 is P itself."""
  v = jnp.zeros(p.shape[:-1], p.dtype)
  return refresh_inverse(p, v, gamma=1 - 1e-12, zeta=zeta, epsilon=epsilon)


def random_spd(rng, d, cond=10.0):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.geomspace(1.0, cond, d)) @ q.T


@pytest.mark.parametrize('gamma', [0.5, 0.95, 0.99])
def test_ema_refresh_is_exact_inverse_float64(gamma):
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for d in (1, 3, 17):
      f = random_spd(rng, d)
      v = rng.normal(size=d)
      want = np.linalg.inv(gamma * f + (1 - gamma) * np.outer(v, v))
      got = np.asarray(ema(jnp.asarray(np.linalg.inv(f)), jnp.asarray(v), gamma))
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_paper_formula_as_printed_is_not_the_inverse():
  """Guard against 'fixing' the formula back to the paper's print."""
  rng = np.random.default_rng(1)
  d, gamma = 5, 0.9
  f = random_spd(rng, d)
  p, v = np.linalg.inv(f), rng.normal(size=d)
  pv = p @ v
  printed = gamma * p + ((1 - gamma) / gamma ** 2) * np.outer(pv, pv) / (
      1 + gamma * (1 - gamma) * v @ pv)
  want = np.linalg.inv(gamma * f + (1 - gamma) * np.outer(v, v))
  assert not np.allclose(printed, want, rtol=1e-2)


def test_blend_refresh_is_inverse_of_blended_plus_rank1():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    d, gamma = 6, 0.95
    p = np.linalg.inv(random_spd(rng, d))
    v = rng.normal(size=d)
    blended = gamma * p + (1 - gamma) * np.eye(d)
    want = np.linalg.inv(np.linalg.inv(blended) + np.outer(v, v))
    got = np.asarray(refresh_inverse(jnp.asarray(p), jnp.asarray(v), gamma=gamma, refresh='blend',
                                      **NO_STAB))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_float32_refresh_matches_float64_reference():
  rng = np.random.default_rng(3)
  d, gamma = 32, 0.95
  f = random_spd(rng, d, cond=5.0)
  v = rng.normal(size=d)
  want = np.linalg.inv(gamma * f + (1 - gamma) * np.outer(v, v))
  got = refresh_inverse(jnp.asarray(np.linalg.inv(f), jnp.float32)[None],
                          jnp.asarray(v, jnp.float32)[None], gamma=gamma, zeta=0.9,
                          epsilon=1e9)[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('refresh', ['ema', 'blend'])
def test_200_random_refreshes_stay_symmetric_positive_definite(refresh):
  rng = np.random.default_rng(4)
  d = 12
  p = jnp.eye(d, dtype=jnp.float32)[None]
  step = jax.jit(lambda p, v: refresh_inverse(p, v, gamma=0.95, zeta=0.9, epsilon=2.0,
                                               refresh=refresh))
  for t in range(200):
    scale = 10.0 ** rng.uniform(-3, 2)
    p = step(p, jnp.asarray(scale * rng.normal(size=(1, d)), jnp.float32))
    q = np.asarray(p[0], np.float64)
    np.testing.assert_array_equal(q, q.T)
    assert np.linalg.eigvalsh(q).min() > 0, f'not positive definite after {t + 1} refreshes'


def test_without_stabiliser_ema_inverse_grows_like_gamma_to_minus_t():
  gamma, d = 0.95, 4
  p = jnp.eye(d)[None]
  v = jnp.zeros((1, d)).at[0, 0].set(1.0)
  for _ in range(30):
    p = refresh_inverse(p, v, gamma=gamma, zeta=0.9, epsilon=np.inf)
  # directions orthogonal to v are never refreshed: (1/gamma)^30
  np.testing.assert_allclose(float(p[0, 1, 1]), gamma ** -30, rtol=1e-4)
  q = jnp.eye(d)[None]
  for _ in range(30):
    q = refresh_inverse(q, v, gamma=gamma, zeta=0.9, epsilon=2.0)
  assert float(jnp.max(jnp.abs(q))) < 2.0 / gamma + 1e-6


def test_stabiliser_fires_exactly_when_max_abs_exceeds_epsilon():
  eps, zeta = 2.0, 0.9
  eye = np.eye(3)
  for peak, fires in [(1.99, False), (2.0, False), (2.01, True), (-2.5, True)]:
    p = np.eye(3, dtype=np.float32) * 0.5
    p[0, 2] = p[2, 0] = peak
    got = np.asarray(stabilise(jnp.asarray(p)[None], eps, zeta)[0])
    want = zeta * p + (1 - zeta) * eye if fires else p
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert fires == (not np.array_equal(got, p))
  # per stack entry: only the large one is blended
  stack = jnp.stack([jnp.eye(2) * 3.0, jnp.eye(2)])
  got = stabilise(stack, eps, zeta)
  np.testing.assert_allclose(got[0], np.eye(2) * (0.9 * 3 + 0.1), rtol=1e-6)
  np.testing.assert_allclose(got[1], np.eye(2))


def _side_jobs(rng, shapes, k, dtype=jnp.float32):
  """``(p, rms, v, keep)`` for dense sides of ``(S, d)`` each: SPD inverses
  of scale about 1, running scales and statistics (``k`` sketches, or one
  mean for ``k = 0``), nothing kept."""
  jobs = []
  for s, d in shapes:
    p = np.stack([np.linalg.inv(random_spd(rng, d)) for _ in range(s)])
    v = rng.normal(size=(s, k, d) if k else (s, d)) * rng.uniform(0.1, 3.0)
    jobs.append((jnp.asarray(p, dtype), jnp.asarray(rng.uniform(0.5, 2.0, size=s), jnp.float32),
                 jnp.asarray(v, dtype), jnp.asarray(False)))
  return jobs


@pytest.mark.parametrize('k', [0, 1, 4])
@pytest.mark.parametrize('damping', [1.0, None])
def test_sides_refreshed_together_equal_each_refreshed_alone(k, damping):
  """Dense sides of several widths and stack sizes, zero-padded and refreshed
  in one group (factors.refresh_relative_many), give each side's own refresh
  (refresh_relative on it alone) to float32 rounding, with the stabiliser
  firing on some of them; a side marked keep comes back exactly as it was."""
  from mkor_optax import factors
  rng = np.random.default_rng(k)
  shapes = [(1, 5), (2, 7), (1, 16), (1, 17), (3, 7)]
  jobs = _side_jobs(rng, shapes, k)
  jobs[1] = (jobs[1][0] * 4.0,) + jobs[1][1:]  # max|P| > epsilon: the stabiliser blends
  jobs[3] = jobs[3][:3] + (jnp.asarray(True),)
  rule = dict(damping=damping, gamma=0.95, zeta=0.9, epsilon=2.0, refresh='ema')
  assert factors._groups([(s, d) for s, d in shapes]) == [[0, 1, 4, 2, 3]]  # one padded group
  together = jax.jit(lambda jobs: factors.refresh_relative_many(jobs, **rule))(jobs)
  for i, (job, (p, rms, reset)) in enumerate(zip(jobs, together)):
    if i == 3:
      np.testing.assert_array_equal(p, job[0])
      np.testing.assert_array_equal(rms, job[1])
      assert not reset.any()
      continue
    want = factors.refresh_relative(*job[:3], **rule)
    assert p.shape == job[0].shape
    np.testing.assert_allclose(p, want[0], rtol=2e-5, atol=2e-6 * np.abs(want[0]).max())
    np.testing.assert_allclose(rms, want[1], rtol=1e-6)
    np.testing.assert_array_equal(reset, want[2])


def test_sides_all_kept_come_back_exactly():
  """A group in which every side is kept (no statistics this accumulation, a
  cancelled mean) returns every inverse and scale bit for bit, resets off."""
  from mkor_optax import factors
  rng = np.random.default_rng(3)
  jobs = [job[:3] + (jnp.asarray(True),) for job in _side_jobs(rng, [(1, 5), (2, 7), (1, 16)], 4)]
  rule = dict(damping=1.0, gamma=0.95, zeta=0.9, epsilon=2.0, refresh='ema')
  together = jax.jit(lambda jobs: factors.refresh_relative_many(jobs, **rule))(jobs)
  for job, (p, rms, reset) in zip(jobs, together):
    np.testing.assert_array_equal(p, job[0])
    np.testing.assert_array_equal(rms, job[1])
    assert not reset.any()


def test_groups_pad_narrow_sides_together_and_leave_wide_ones_alone():
  """Sides of similar width share a group; a side that would make padding
  cost more than PAD_WASTE times the entries of a large group starts a new
  one; sides wider than GROUP_MAX_DIM stay alone."""
  from mkor_optax import factors
  widths = [(1, 65), (1, 129), (1, 65), (1, 17), (1, 128), (1, 64), (1, 16)]
  assert factors._groups(widths) == [[6, 3, 5, 0, 2, 4, 1]]  # the autoencoder's: 1 group
  assert sorted(factors._groups([(1, 600), (1, 40), (1, 40), (1, 2000)])) == [[0], [1, 2], [3]]
  # 40 padded to 600 is cheap beside 600 itself (within PAD_WASTE): one group
  assert factors._groups([(1, 600), (1, 40), (1, 620)]) == [[1, 0, 2]]


def test_low_rank_groups_count_d_k_entries():
  """A low-rank side holds d k entries, not d^2: the demo's eight low-rank
  sides (256 to 513 wide, rank 8) form one group, where counted as dense
  they would form two, and no width is too wide to share one; sides whose
  padding would exceed PAD_WASTE times their entries (and PAD_FREE) still
  start a new group."""
  from mkor_optax import factors
  demo = [(1, d) for d in (513, 257, 257, 513, 512, 256, 256, 512)]
  assert len(factors._groups(demo)) == 2
  assert [sorted(g) for g in factors._groups(demo, 8)] == [list(range(8))]
  assert factors._groups([(1, 4097), (1, 1025)], 8) == [[1, 0]]
  assert factors._groups([(1, 4097), (1, 1025)]) == [[1], [0]]
  assert len(factors._groups([(16, 256), (1, 40000)], 8)) == 2  # 17 x 40000 x 8 > PAD_FREE, > 2x


@pytest.mark.parametrize('k', [0, 4])
def test_low_rank_sides_refreshed_together_equal_each_refreshed_alone(k):
  """Low-rank sides of one rank and different widths (bases padded with zero
  rows) give each side's own refresh, the stabiliser firing on one, beside a
  dense side that groups apart."""
  from mkor_optax import factors, lowrank
  rng = np.random.default_rng(10 + k)
  rule = dict(damping=1.0, gamma=0.95, zeta=0.9, epsilon=2.0, refresh='ema')
  jobs = []
  for s, d in [(1, 40), (2, 33), (1, 48)]:
    p, rms = lowrank.identity(d, 4, s, jnp.float32), jnp.zeros((s,), jnp.float32)
    for _ in range(6):  # a few refreshes: a basis with content, s of both signs
      v = jnp.asarray(rng.normal(size=(s, k, d) if k else (s, d)), jnp.float32)
      p, rms, _ = factors.refresh_relative(p, rms, v, **rule)
    v = jnp.asarray(rng.normal(size=(s, k, d) if k else (s, d)) * 3.0, jnp.float32)
    jobs.append((p, rms, v, jnp.asarray(False)))
  jobs[1] = (jobs[1][0]._replace(c=jobs[1][0].c * 3.0),) + jobs[1][1:]  # max|P| > epsilon
  dense = _side_jobs(rng, [(1, 9)], k)[0]
  jobs.append(dense)
  together = jax.jit(lambda jobs: factors.refresh_relative_many(jobs, **rule))(jobs)
  for job, (p, rms, reset) in zip(jobs, together):
    want = factors.refresh_relative(*job[:3], **rule)
    got_dense = lowrank.to_dense(p) if isinstance(p, lowrank.LowRankInverse) else p
    want_dense = lowrank.to_dense(want[0]) if isinstance(want[0], lowrank.LowRankInverse) else want[0]
    assert got_dense.shape == want_dense.shape
    np.testing.assert_allclose(got_dense, want_dense, rtol=1e-4, atol=1e-5 * np.abs(want_dense).max())
    np.testing.assert_allclose(rms, want[1], rtol=1e-6)
    np.testing.assert_array_equal(reset, want[2])


@pytest.mark.parametrize('k', [1, 4])
def test_a_result_beyond_float32_keeps_the_inverse_it_started_from(k):
  """A refresh whose result would overflow (a huge stored inverse, a
  stabiliser that never fires) returns the inverse it started from and
  flags the entry; its neighbour in the stack is refreshed as usual, equal
  to its refresh alone. The finiteness test is a bound on the result's
  entries, not a pass over them: this is where the bound must hold."""
  rng = np.random.default_rng(3)
  d = 6
  ok_p = random_spd(rng, d).astype(np.float32)
  huge = (3e38 * np.eye(d)).astype(np.float32)
  p = jnp.asarray(np.stack([ok_p, huge]))
  v = jnp.asarray(rng.normal(size=(2, k, d)), jnp.float32)
  rule = dict(gamma=0.5, zeta=0.4, epsilon=np.inf)  # 1/gamma doubles the huge one past float32
  refresh = (lambda p, v: rank1.refresh_inverse_checked(p, v[:, 0], **rule)) if k == 1 else (
      lambda p, v: rank1.refresh_inverse_rank_k_checked(p, v, **rule))
  out, reset = refresh(p, v)
  alone, alone_reset = refresh(p[:1], v[:1])
  np.testing.assert_array_equal(np.asarray(out[1]), huge)
  np.testing.assert_array_equal(np.asarray(reset), [False, True])
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(alone[0]))
  assert not bool(alone_reset[0]) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize('k', [1, 4])
def test_scale_and_keep_equal_a_scaled_inverse_refreshed_then_kept(k):
  """``scale`` refreshes ``scale * p`` in the rule's one pass, bit for bit as
  scaling first; ``keep`` returns those entries as given, unflagged."""
  rng = np.random.default_rng(4)
  d = 5
  p = jnp.asarray(np.stack([random_spd(rng, d) for _ in range(3)]), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, k, d)), jnp.float32)
  scale = jnp.asarray([0.5, 3.0, 1.7], jnp.float32)
  keep = jnp.asarray([False, True, False])
  rule = dict(gamma=0.9, zeta=0.5, epsilon=2.0)
  refresh = (lambda p, **kw: rank1.refresh_inverse_checked(p, v[:, 0], **rule, **kw)) if k == 1 else (
      lambda p, **kw: rank1.refresh_inverse_rank_k_checked(p, v, **rule, **kw))
  got, reset = jax.jit(lambda p: refresh(p, scale=scale, keep=keep))(p)
  want, want_reset = jax.jit(lambda p: refresh(p * scale[:, None, None]))(p)
  for i in (0, 2):
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want[i]))
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(p[1]))
  np.testing.assert_array_equal(np.asarray(reset), np.asarray(want_reset) & np.asarray(~keep))


def test_a_float64_inverse_beyond_float32_range_is_refreshed():
  """The finiteness bound is its dtype's: a float64 inverse with entries past
  float32's range refreshes as the float64 formula says, unflagged."""
  with jax.enable_x64(True):
    d = 4
    p = jnp.asarray(3e38 * np.eye(d))
    v = jnp.asarray(np.random.default_rng(5).normal(size=(1, d)))
    out, reset = rank1.refresh_inverse_checked(p[None], v, gamma=0.5, zeta=0.4, epsilon=np.inf)
    # Sherman-Morrison in float64 by hand (inverting F itself is too ill-conditioned here)
    pn, vn, g = np.asarray(p), np.asarray(v[0]), 0.5
    pv = pn @ vn
    want = pn / g - ((1 - g) / g ** 2) / (1 + ((1 - g) / g) * vn @ pv) * np.outer(pv, pv)
    # (to 1e-3: at these magnitudes the rule's cap on the rank-1 weight, relative
    # to max|P|, moves the result by about 2e-4; kept, it would equal p)
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert not bool(reset[0]) and np.all(np.isfinite(np.asarray(out)))
