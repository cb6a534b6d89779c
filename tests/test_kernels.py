"""cgl_jax.kernels: every implementation through the registry, and the choice among them.

Each pair-sum implementation runs the group-coherence tests of tests/test_losses.py
(finite differences, ties, degenerate maps, bfloat16, vmap) as `group_coherence`'s
``pair_sums``; each L_s implementation its tests as ``per_map``. The Pallas kernels run
in Pallas' interpreter on this CPU; the C++ ones are skipped where they do not build.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cgl_jax import kernels
from cgl_jax import losses
from cgl_jax.kernels import xla


def uniform(seed, shape, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def pair_sums_here(name):
  """The named pair sums, runnable on this CPU (Pallas interpreted)."""
  if not kernels.available(name):
    pytest.skip(f'{name!r} is not available here')
  return kernels.pair_sums(name, interpret=name == 'pallas')


def per_map_here(name):
  if not kernels.available(name):
    pytest.skip(f'{name!r} is not available here')
  return kernels.per_map(name)


# The Pallas kernels compute in float32: too coarse for float64 finite differences (the
# autodiff comparison below covers them).
FLOAT64_PAIR_SUMS = [name for name in kernels.PAIR_SUMS if name != 'pallas']


@pytest.fixture(params=kernels.PAIR_SUMS)
def pair_sums(request):
  return pair_sums_here(request.param)


@pytest.fixture(params=kernels.PER_MAP)
def per_map(request):
  return per_map_here(request.param)


def sampled(pair_sums, **options):
  options.setdefault('key', jax.random.key(0))
  return lambda x: losses.group_coherence(x, 2, pairs='sampled', pair_sums=pair_sums, **options)


# ----------------------------------------------------------------------------
# Every implementation: values and gradients.
# ----------------------------------------------------------------------------


def test_pair_sums_agree_with_a_hand_computation(pair_sums, maybe_jit):
  x = jnp.asarray(uniform(12, (3, 20, 13)))  # [B, HW, C]: G = 2, f = 6, one free channel
  pairs = jnp.array([(0, 5), (5, 0), (2, 3), (2, 3), (4, 1)], jnp.int32)
  grouped = np.asarray(x)[..., :12].reshape(3, 20, 2, 6)
  by_hand = np.abs(grouped[..., [0, 5, 2, 2, 4]] - grouped[..., [5, 0, 3, 3, 1]]).sum(1)
  got = maybe_jit(lambda m: pair_sums(m, pairs, num_groups=2))(x)
  assert got.shape == (3, 2, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, by_hand, rtol=1e-6)


@pytest.mark.parametrize('name', FLOAT64_PAIR_SUMS)
@pytest.mark.parametrize('reduction', losses.REDUCTIONS)
def test_group_coherence_gradient_matches_finite_differences(name, reduction):
  fn = sampled(pair_sums_here(name), num_pairs=12, reduction=reduction)
  with jax.enable_x64(True):
    psi = jnp.asarray(uniform(4, (2, 3, 3, 7), 0.05, 0.95), jnp.float64)
    check_grads(jax.jit(fn), (psi,), order=1, modes=['rev'], eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('reduction', losses.REDUCTIONS)
def test_gradient_equals_autodiff_of_the_formula_with_ties(pair_sums, reduction):
  """Every implementation's gradient (incl. 'jnp', `losses.group_coherence`'s default) =
  autodiff of D on gathered maps.

  With repeated pairs, both orders of a pair, and two tied filters (|p − q| has
  derivative sign(0) = 0 there, as for jnp.abs), where finite differences do not apply.
  """
  psi = np.array(uniform(11, (2, 3, 4, 8), 0.05, 0.95))  # G = 2, f = 4
  psi[..., 1] = psi[..., 0]  # filters 0 and 1 of group 0 tie everywhere
  pairs = np.array([(0, 1), (1, 0), (2, 3), (2, 3), (3, 0), (1, 2)], np.int32)

  def gathered_formula(x):
    grouped = x.reshape(2, 12, 2, 4)  # [B, HW, G, f]
    distance = losses.soft_jaccard_distance(
        grouped[..., pairs[:, 0]], grouped[..., pairs[:, 1]],
        axis=1 if reduction == 'per_sample' else (0, 1))  # [B, G, r] or [G, r]
    return distance.mean(-1) if reduction == 'pooled' else distance.mean((0, 2))

  fn = sampled(pair_sums, key=None, pair_indices=pairs, reduction=reduction)
  readout = jnp.array([0.7, -1.3])
  want_value, want_grad = jax.value_and_grad(lambda x: gathered_formula(x) @ readout)(psi)
  got_value, got_grad = jax.jit(jax.value_and_grad(lambda x: fn(x) @ readout))(psi)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
  assert np.any(got_grad[..., :2] != 0)  # the tied pair's other terms still flow


@pytest.mark.parametrize('fill', [0.0, 0.5], ids=['all_zero', 'constant'])
@pytest.mark.parametrize('reduction', losses.REDUCTIONS)
def test_degenerate_maps_give_zero_and_finite_gradients(pair_sums, fill, reduction):
  psi = jnp.full((2, 3, 3, 6), fill)
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(sampled(pair_sums, reduction=reduction)(x))))(psi)
  assert value == 0.0 and np.all(np.isfinite(grad))


def test_non_finite_values_propagate_like_the_jnp_code(pair_sums):
  x = jnp.asarray(uniform(3, (2, 18, 9)))  # G = 2, f = 4, one free channel (made nan)
  x = x.at[0, 5, 1].set(jnp.nan).at[1, 7, 6].set(jnp.inf).at[1, 7, 7].set(jnp.inf)
  x = x.at[:, :, 8].set(jnp.nan)
  pairs = jnp.array([[0, 1], [2, 3], [3, 0], [1, 2]], jnp.int32)
  want = losses.pair_l1_sums(x, pairs, num_groups=2)
  got = pair_sums(x, pairs, num_groups=2)
  assert np.isnan(got[0, 0, 0]) and np.isnan(got[1, 1, 1])  # nan, and inf − inf
  if pair_sums is kernels.pair_sums('matmul'):
    # 0·nan = nan in the incidence matmul: a non-finite filter spoils its group's pairs.
    assert np.all(np.isnan(got)[np.isnan(want)])
    np.testing.assert_allclose(got[0, 1], want[0, 1], rtol=1e-6)  # the other group
  else:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-6)  # nan == nan here
  grad = jax.grad(lambda m: jnp.sum(pair_sums(m, pairs, num_groups=2)[0]))(x)
  assert not np.any(grad[..., 8])  # a nan free channel is not read


def test_bfloat16_psi_is_computed_in_float32(pair_sums):
  fn = jax.jit(sampled(pair_sums, reduction='pooled'))
  x_bf16 = jnp.asarray(uniform(8, (2, 4, 4, 6)), jnp.bfloat16)
  got = fn(x_bf16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, fn(x_bf16.astype(jnp.float32)), rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda x: jnp.sum(fn(x)))(x_bf16)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_vmap_matches_a_loop(pair_sums):
  fn = jax.jit(sampled(pair_sums))
  stack = jnp.asarray(uniform(9, (3, 2, 4, 4, 6)))
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(stack), jnp.stack([fn(x) for x in stack]),
                             rtol=1e-6, atol=1e-7)
  # A named batch axis: the statistics of the full batch.
  full = fn(stack.reshape(6, 4, 4, 6))
  sharded = jax.jit(jax.vmap(sampled(pair_sums, axis_name='b'), axis_name='b'))(stack)
  np.testing.assert_allclose(sharded, jnp.broadcast_to(full, (3, 2)), rtol=1e-6)


def test_per_map_matches_the_formula_and_its_gradient(per_map, maybe_jit):
  psi = jnp.asarray(uniform(6, (2, 4, 5, 3), 0.05, 1.0))
  fn = lambda x: losses.spatial_concentration(x, per_map=per_map)
  want = jax.value_and_grad(losses.spatial_concentration)(psi)
  got = maybe_jit(jax.value_and_grad(fn))(psi)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=2e-5 * np.max(np.abs(want[1])))
  with jax.enable_x64(True):
    check_grads(jax.jit(fn), (jnp.asarray(psi, jnp.float64),), order=1, modes=['rev'],
                eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('fill', [0.0, 0.5], ids=['all_zero', 'constant'])
def test_per_map_is_finite_on_degenerate_maps(per_map, fill):
  psi = jnp.full((2, 3, 4, 2), fill)
  fn = lambda x, eps: losses.spatial_concentration(x, eps=eps, per_map=per_map)
  value, grad = jax.value_and_grad(fn)(psi, 1e-4)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  assert fill != 0.0 or value == 0.0
  single = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)  # on its own centre, eps = 0
  value, grad = jax.value_and_grad(fn)(single, 0.0)
  assert value == 0.0 and np.all(np.isfinite(grad))


def test_per_map_bfloat16_and_vmap(per_map):
  fn = jax.jit(lambda x: losses.spatial_concentration(x, per_map=per_map))
  x_bf16 = jnp.asarray(uniform(8, (2, 4, 4, 6)), jnp.bfloat16)
  assert fn(x_bf16).dtype == jnp.float32
  np.testing.assert_allclose(fn(x_bf16), fn(x_bf16.astype(jnp.float32)), rtol=1e-6)
  stack = jnp.asarray(uniform(9, (3, 2, 4, 4, 6)))
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(stack), jnp.stack([fn(x) for x in stack]),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# Lowering: each implementation compiles to what it claims, on its platforms.
# ----------------------------------------------------------------------------


def _lowered_text(fn, platform, *args):
  # Neither the Triton nor our CPU kernels' custom calls have an export compatibility
  # guarantee; we only read the text.
  from cgl_jax.kernels import cpu  # pylint: disable=g-import-not-at-top
  custom_calls = [jax.export.DisabledSafetyCheck.custom_call(name) for name in (
      '__gpu$xla.gpu.triton', *[name for by_dtype in cpu.TARGETS.values()
                                for pair in by_dtype.values() for name in pair])]
  return jax.export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=custom_calls)(*args).mlir_module()


@pytest.mark.parametrize('name, platform, dtype', [
    ('jnp', 'cpu', 'float32'), ('jnp', 'tpu', 'float32'),
    ('loop', 'cpu', 'float32'), ('loop', 'cpu', 'float64'),
    ('cpu_ffi', 'cpu', 'float32'), ('cpu_ffi', 'cpu', 'float64'),
    ('matmul', 'cuda', 'float32'), ('matmul', 'cuda', 'float64'),
    ('matmul', 'rocm', 'float32'), ('matmul', 'tpu', 'float32'),
    ('pallas', 'cuda', 'float32')])
def test_value_and_gradient_lower_to_the_implementation(name, platform, dtype):
  if not kernels.available(name):
    pytest.skip(f'{name!r} is not available here')
  from cgl_jax.kernels import cpu  # pylint: disable=g-import-not-at-top
  pair_sums = kernels.pair_sums(name)  # compiled, not interpreted
  with jax.enable_x64(dtype == 'float64'):
    x = jnp.asarray(uniform(12, (3, 20, 13)), dtype)
    pairs = jnp.array([(0, 5), (5, 0), (2, 3)], jnp.int32)
    forward, backward = cpu.TARGETS['PairL1'][jnp.dtype(dtype)]
    value = lambda m, p: pair_sums(m, p, num_groups=2)
    grad = jax.grad(lambda m, p: jnp.sum(value(m, p) ** 2))
    for fn, target in ((value, forward), (grad, backward)):
      module = _lowered_text(fn, platform, x, pairs)
      assert ('stablehlo.dot_general' in module) == (name == 'matmul')
      assert module.count('@__gpu$xla.gpu.triton') == (name == 'pallas') * (1 + (fn is grad))
      assert (f'@{target}(' in module) == (name == 'cpu_ffi')
      if name != 'pallas':  # (Pallas' lowering has loops of its own)
        assert ('stablehlo.while' in module) == (name == 'loop')
      if name == 'jnp':
        assert 'custom_call' not in module


# ----------------------------------------------------------------------------
# The XLA forms' pieces.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_identity_outside_ynnpack_is_exact_for_every_value(dtype, maybe_jit):
  info = np.finfo(dtype)
  rng = np.random.default_rng(0)
  exponents = rng.integers(info.minexp // 4, info.maxexp // 4, 500)  # decimal ~ binary / 3.3
  values = (rng.normal(size=500) * 10.0 ** exponents).astype(dtype)
  values = np.concatenate([values, np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, info.tiny,
                                             info.smallest_subnormal, info.max], dtype)])
  with jax.enable_x64(dtype == 'float64'):
    x = jnp.asarray(values, dtype)
    np.testing.assert_array_equal(maybe_jit(xla.identity_outside_ynnpack)(x), x)


def test_incidence_list_is_sorted_by_filter_and_covers_each_pair_twice():
  pairs = jnp.array([(3, 0), (1, 3), (3, 0), (2, 1)], jnp.int32)
  starts, owner, other, pair = map(np.asarray, xla.pair_incidences(pairs, 5))
  np.testing.assert_array_equal(starts, [0, 2, 4, 5, 8, 8])  # filter 4 has no pair
  listed = {(filter_index, int(other[e]), int(pair[e]))
            for filter_index in range(5) for e in range(starts[filter_index],
                                                         starts[filter_index + 1])}
  want = {(int(i), int(j), k) for k, (i, j) in enumerate(np.asarray(pairs))}
  want |= {(j, i, k) for i, j, k in want}
  assert listed == want and len(other) == 8
  np.testing.assert_array_equal(owner, [0, 0, 1, 1, 2, 3, 3, 3])
  # Stable: within a filter, the pairs where it is first, then those where it is second.
  np.testing.assert_array_equal(pair, [0, 2, 1, 3, 3, 0, 2, 1])


# ----------------------------------------------------------------------------
# The registry and the choice.
# ----------------------------------------------------------------------------


def _usable(*names):
  return lambda name: name in ('jnp', 'loop', 'matmul', *names)


@pytest.mark.parametrize('platform, devices, dtype, usable, want', [
    ('cpu', 1, 'float32', ('cpu_ffi',), ('cpu_ffi', 'cpu_ffi')),
    ('cpu', 1, 'float64', ('cpu_ffi',), ('cpu_ffi', 'cpu_ffi')),
    ('cpu', 1, 'float32', (), ('loop', 'jnp')),          # the C++ did not build
    ('cpu', 8, 'float32', ('cpu_ffi',), ('loop', 'jnp')),
    ('cpu', 1, 'bfloat16', ('cpu_ffi',), ('loop', 'jnp')),
    ('cuda', 1, 'float32', ('pallas',), ('pallas', 'jnp')),
    ('cuda', 1, 'float32', (), ('matmul', 'jnp')),       # no Pallas Triton bindings
    ('cuda', 1, 'float64', ('pallas',), ('matmul', 'jnp')),
    ('cuda', 8, 'float32', ('pallas',), ('matmul', 'jnp')),
    ('rocm', 1, 'float32', ('pallas', 'cpu_ffi'), ('matmul', 'jnp')),
    ('tpu', 1, 'float32', ('pallas', 'cpu_ffi'), ('matmul', 'jnp')),
    ('tpu', 256, 'float32', (), ('matmul', 'jnp'))])
def test_select_picks_the_fastest_usable_implementation(platform, devices, dtype, usable, want):
  got = kernels.select(platform, num_devices=devices, dtype=dtype, is_available=_usable(*usable))
  assert (got.pair_sums, got.per_map) == want


def test_select_on_this_machine_uses_what_builds():
  got = kernels.select('cpu', num_devices=1, dtype=jnp.float32)
  assert got.pair_sums == ('cpu_ffi' if kernels.available('cpu_ffi') else 'loop')


def test_resolve_names_and_errors():
  assert kernels.resolve('loop', platform='tpu', num_devices=4, dtype='float32') == (
      kernels.Selection(pair_sums='loop', per_map='jnp'))
  assert kernels.resolve('cpu_ffi', platform='cpu', num_devices=4, dtype='float32') == (
      kernels.Selection(pair_sums='cpu_ffi', per_map='cpu_ffi'))
  assert kernels.resolve('jnp', platform='cpu', num_devices=1, dtype='float32') == (
      kernels.Selection(pair_sums='jnp', per_map='jnp'))
  with pytest.raises(ValueError, match=r"unknown kernel implementation 'fast'; choose one of "
                                       r"\('auto', 'jnp', 'loop', 'matmul', 'cpu_ffi', 'pallas'\)"):
    kernels.resolve('fast', platform='cpu', num_devices=1, dtype='float32')
  with pytest.raises(kernels.KernelUnavailableError,
                     match=r"the 'pallas' kernels run on \('cuda',\) only; this platform is 'cpu'"):
    kernels.resolve('pallas', platform='cpu', num_devices=1, dtype='float32')
  with pytest.raises(kernels.KernelUnavailableError, match="'cpu_ffi' kernels run on"):
    kernels.resolve('cpu_ffi', platform='tpu', num_devices=1, dtype='float32')
  with pytest.raises(ValueError, match="unknown pair-sum implementation 'auto'"):
    kernels.pair_sums('auto')
  with pytest.raises(ValueError, match="unknown L_s per-map implementation 'loop'"):
    kernels.per_map('loop')
  with pytest.raises(ValueError, match="interpret=True applies to the 'pallas' pair sums only"):
    kernels.pair_sums('loop', interpret=True)
  assert kernels.pair_sums('jnp') is losses.pair_l1_sums
  assert kernels.per_map('jnp') is losses.spatial_concentration_maps
  assert kernels.current_platform() == jax.default_backend() == 'cpu'


def test_pallas_without_triton_bindings_is_named(python_subprocess):
  """A jaxlib without Pallas' Triton bindings: 'pallas' is unavailable, 'auto' picks 'matmul'."""
  proc = python_subprocess("""
      import sys
      sys.modules['jax.experimental.pallas.triton'] = None  # as if this jaxlib lacked it
      from cgl_jax import kernels
      assert not kernels.available('pallas')
      assert kernels.select('cuda', num_devices=1, dtype='float32').pair_sums == 'matmul'
      try:
        kernels.pair_sums('pallas')
      except kernels.KernelUnavailableError as error:
        print(error)
  """)
  assert "the 'pallas' pair sums need jax.experimental.pallas.triton" in proc.stdout
