"""cgl_jax.kernels.cpu: the C++ (XLA FFI) CPU kernels of L_g's pair sums and L_s, and their build.

The kernels are checked against the XLA loop (the backward bit for bit, since both walk
the same filter-sorted incidences) and the jax.numpy code, against NumPy, for
thread-count independence, under vmap, and for the build's cache and failure paths.
tests/test_kernels.py also runs the group-coherence and L_s tests through them.
"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import kernels
from cgl_jax import losses
from cgl_jax.kernels import cpu as cpu_kernels
from cgl_jax.kernels import xla

pytestmark = pytest.mark.skipif(not kernels.available('cpu_ffi'),
                                reason='the C++ CPU kernel does not build here (no compiler?)')


def _maps(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).uniform(0, 1, shape).astype(dtype)


def _vjp(pair_sums, x, pairs, cotangent):
  value, pullback = jax.vjp(lambda m: pair_sums(m, pairs), x)
  return value, pullback(cotangent)[0]


def _loop(num_groups):  # the XLA loop on ψ's grouped channels: [B, N, C] → [B, G, r]
  return lambda x, pairs: xla.loop_pair_l1(x, pairs, num_groups=num_groups)


def _kernel(num_groups):
  return lambda x, pairs: cpu_kernels.pair_l1(x, pairs, num_groups=num_groups)


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('shape, num_groups, num_pairs', [
    ((3, 20, 13), 2, 7),       # N not a multiple of 16, f = 6 and one free channel
    ((2, 1024, 256), 5, 153),  # ShapesCNN conv2: f = 51, r = 3f, one free channel
    ((4, 169, 384), 5, 16),    # AlexNet conv4's 13×13: f = 76, four free channels
    ((2, 9, 8), 1, 5),         # one group, no free channel
])
def test_value_and_gradient_match_the_xla_loop(shape, num_groups, num_pairs, dtype, maybe_jit):
  group_size = shape[-1] // num_groups
  with jax.enable_x64(dtype == 'float64'):
    x = jnp.asarray(_maps(0, shape, dtype))
    x = x.at[..., 1].set(x[..., 0])  # group 0's filters 0 and 1 tie: sign(0) = 0
    pairs = jnp.concatenate([jnp.array([[0, 1], [1, 0], [2, 3], [2, 3]], jnp.int32),
                             losses.sample_pairs(jax.random.key(1), group_size, num_pairs - 4)])
    cotangent = jax.random.normal(jax.random.key(2), (shape[0], num_groups, num_pairs), dtype)
    want_value, want_grad = _vjp(_loop(num_groups), x, pairs, cotangent)
    got_value, got_grad = maybe_jit(lambda m, c: _vjp(_kernel(num_groups), m, pairs, c))(
        x, cotangent)
    assert got_value.dtype == got_grad.dtype == jnp.dtype(dtype)
    assert got_value.shape == want_value.shape and got_grad.shape == x.shape
    # The forward sums in another order (16 partial sums) than XLA's reduction.
    np.testing.assert_allclose(got_value, want_value, rtol=1e-6 if dtype == 'float32' else 1e-13)
    np.testing.assert_array_equal(got_grad, want_grad)  # same incidences, same order
    assert not np.any(got_grad[..., num_groups * group_size:])  # free channels
    grouped = np.asarray(x)[..., :num_groups * group_size].reshape(
        *shape[:-1], num_groups, group_size)
    by_hand = np.abs(grouped[..., pairs[:, 0]] - grouped[..., pairs[:, 1]]).sum(1)
    np.testing.assert_allclose(got_value, by_hand, rtol=1e-5 if dtype == 'float32' else 1e-12)


def test_non_finite_values_propagate_as_in_the_xla_loop():
  x = jnp.asarray(_maps(3, (2, 18, 9)))  # G = 2, f = 4, one free channel (made nan)
  x = x.at[0, 5, 1].set(jnp.nan).at[1, 7, 6].set(jnp.inf).at[1, 7, 7].set(jnp.inf)
  x = x.at[:, :, 8].set(jnp.nan)
  pairs = jnp.array([[0, 1], [2, 3], [3, 0], [1, 2]], jnp.int32)
  cotangent = jnp.array([[[1.0, -2.0, 0.5, 3.0], [jnp.inf, 1.0, -1.0, 0.0]]] * 2)
  want_value, want_grad = _vjp(_loop(2), x, pairs, cotangent)
  got_value, got_grad = _vjp(_kernel(2), x, pairs, cotangent)
  np.testing.assert_array_equal(np.isnan(got_value), np.isnan(want_value))
  np.testing.assert_allclose(got_value, want_value, rtol=1e-6)  # nan == nan here
  np.testing.assert_array_equal(got_grad, want_grad)
  assert np.isnan(got_value[0, 0, 0]) and np.isnan(got_grad[1, 7, 6])  # inf − inf
  assert not np.any(got_grad[..., 8])  # a nan free channel is not read


def test_out_of_range_pair_indices_are_read_as_dynamic_slices_read_them():
  """No read outside a group: an index counts from the end if negative, then is clamped.

  (`group_coherence` rejects such indices when it can see them; traced ones
  cannot be checked.) The gradient is that of the value so read.
  """
  x = jnp.asarray(_maps(4, (2, 9, 10)))  # G = 2, f = 5
  pairs = jnp.array([[-3, 2], [1, 9], [4, 0], [-9, 3]], jnp.int32)
  as_read = jnp.array([[2, 2], [1, 4], [4, 0], [0, 3]], jnp.int32)
  cotangent = jnp.ones((2, 2, 4))
  got = _vjp(_kernel(2), x, pairs, cotangent)
  for got_part, want_part in zip(got, _vjp(_loop(2), x, as_read, cotangent)):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-6)
  np.testing.assert_allclose(got[0], _loop(2)(x, pairs), rtol=1e-6)  # the loop reads alike


def test_leading_axes_and_vmap():
  x = jnp.asarray(_maps(5, (3, 2, 20, 12)))  # two leading axes
  pairs = jnp.array([[0, 5], [3, 1]], jnp.int32)
  both = cpu_kernels.pair_l1(x, pairs, num_groups=2)
  assert both.shape == (3, 2, 2, 2)
  np.testing.assert_array_equal(both[1], cpu_kernels.pair_l1(x[1], pairs, num_groups=2))
  np.testing.assert_array_equal(jax.vmap(lambda m: cpu_kernels.pair_l1(m, pairs, num_groups=2))(x),
                                both)


def test_results_do_not_depend_on_the_thread_count(tmp_path, python_subprocess):
  """One XLA thread and the default pool give identical bits (each output has one owner)."""
  np.save(tmp_path / 'psi.npy', _maps(6, (16, 256, 256)))
  code = f"""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from cgl_jax import losses
    from cgl_jax.kernels import cpu as cpu_kernels
    psi = jnp.asarray(np.load({str(tmp_path / 'psi.npy')!r}))
    pairs = losses.sample_pairs(jax.random.key(1), 51, 153)
    value, pullback = jax.vjp(lambda m: cpu_kernels.pair_l1(m, pairs, num_groups=5), psi)
    grad = pullback(jnp.cos(value))[0]
    concentration, pullback = jax.vjp(cpu_kernels.spatial_concentration_maps,
                                      psi.reshape(16, 16, 16, 256))
    grad_concentration = pullback(jnp.sin(concentration))[0]
    np.save(os.environ['OUT'], np.concatenate([np.ravel(a) for a in (
        value, grad, concentration, grad_concentration)]))
  """
  python_subprocess(code, env={'OUT': str(tmp_path / 'pool.npy')})
  python_subprocess(code, env={'OUT': str(tmp_path / 'one.npy'), 'XLA_FLAGS': (
      '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')})
  np.testing.assert_array_equal(np.load(tmp_path / 'pool.npy'), np.load(tmp_path / 'one.npy'))


def test_rejects_what_it_cannot_compute():
  with pytest.raises(TypeError, match='float32 or float64 values; got bfloat16'):
    cpu_kernels.pair_l1(jnp.zeros((2, 3, 4), jnp.bfloat16), jnp.array([[0, 1]]), num_groups=2)
  with pytest.raises(ValueError, match=r'pair_indices must have shape \[r, 2\]; got \(3,\)'):
    cpu_kernels.pair_l1(jnp.zeros((2, 3, 4)), jnp.array([0, 1, 2]), num_groups=2)
  with pytest.raises(ValueError, match=r'num_groups must lie in \[1, C = 4\]; got 5'):
    cpu_kernels.pair_l1(jnp.zeros((2, 3, 4)), jnp.array([[0, 1]]), num_groups=5)


# ----------------------------------------------------------------------------
# L_s per map.
# ----------------------------------------------------------------------------


def _numpy_spatial_concentration_maps(psi, eps):
  _, height, width, _ = psi.shape
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  mass = psi.sum((1, 2)) + eps  # [B, C]
  centre_row = (rows[None, :, :, None] * psi).sum((1, 2)) / mass
  centre_col = (cols[None, :, :, None] * psi).sum((1, 2)) / mass
  distance = np.sqrt((rows[None, :, :, None] - centre_row[:, None, None, :]) ** 2
                     + (cols[None, :, :, None] - centre_col[:, None, None, :]) ** 2)
  return (psi * distance).sum((1, 2)) / mass


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('shape', [
    (3, 5, 7, 6),        # non-square, C below one channel block
    (2, 13, 13, 300),    # AlexNet's 13×13, C over two blocks of 128 (the last partial)
    (4, 32, 32, 256),    # ShapesCNN conv2
])
def test_spatial_concentration_value_and_gradient_match_the_formula(shape, dtype, maybe_jit):
  with jax.enable_x64(dtype == 'float64'):
    psi = jnp.asarray(_maps(8, shape, dtype))
    cotangent = jax.random.normal(jax.random.key(3), (shape[0], shape[3]), dtype)
    xla = functools.partial(losses.spatial_concentration_maps, eps=1e-4)
    kernel = functools.partial(cpu_kernels.spatial_concentration_maps, eps=1e-4)
    want_value, want_grad = _vjp_maps(xla, psi, cotangent)
    got_value, got_grad = maybe_jit(lambda x, c: _vjp_maps(kernel, x, c))(psi, cotangent)
    assert got_value.dtype == got_grad.dtype == jnp.dtype(dtype)
    assert got_value.shape == shape[::3] and got_grad.shape == shape
    tolerance = 2e-5 if dtype == 'float32' else 1e-11
    np.testing.assert_allclose(got_value, want_value, rtol=tolerance)
    np.testing.assert_allclose(
        got_value, _numpy_spatial_concentration_maps(np.asarray(psi, np.float64), 1e-4),
        rtol=tolerance)
    scale = np.max(np.abs(want_grad))
    np.testing.assert_allclose(got_grad, want_grad, rtol=tolerance, atol=tolerance * scale)


def _vjp_maps(fn, psi, cotangent):
  value, pullback = jax.vjp(fn, psi)
  return value, pullback(cotangent)[0]


@pytest.mark.parametrize('eps', [1e-4, 0.0])
def test_spatial_concentration_degenerate_maps_match_the_formula(eps):
  """Empty maps (value 0), single pixels (d = 0 at the centre), negative mass."""
  psi = np.zeros((3, 4, 5, 4), np.float64)
  psi[0, 2, 3, 1] = 0.7             # one pixel: distance 0 at the centre
  psi[1, :, :, 2] = 1.0             # uniform
  psi[2, 1, 1, 3] = psi[2, 3, 4, 3] = 0.5
  psi[2, :, :, 0] = -_maps(9, (4, 5))  # negative mass (not a mask, but defined)
  with jax.enable_x64(True):
    psi = jnp.asarray(psi)
    cotangent = jnp.asarray(np.arange(12, dtype=np.float64).reshape(3, 4) - 5)
    got = _vjp_maps(functools.partial(cpu_kernels.spatial_concentration_maps, eps=eps), psi,
                    cotangent)
    want = _vjp_maps(functools.partial(losses.spatial_concentration_maps, eps=eps), psi,
                     cotangent)
    for got_part, want_part in zip(got, want):
      assert np.all(np.isfinite(got_part))
      np.testing.assert_allclose(got_part, want_part, rtol=1e-11, atol=1e-12)
    assert got[0][0, 0] == 0  # the empty map counts 0 ...
    if eps == 0:  # ... and, with nothing added to its mass, has zero gradient
      assert np.all(got[1][0, ..., 0] == 0)


def test_spatial_concentration_runs_the_kernel_as_per_map():
  psi = jnp.asarray(_maps(10, (2, 6, 6, 9)))
  fn = lambda x: losses.spatial_concentration(x, per_map=kernels.per_map('cpu_ffi'))
  lowered = jax.jit(jax.value_and_grad(fn)).lower(psi).as_text()
  assert 'CglSpatialConcentrationForwardF32' in lowered
  assert 'CglSpatialConcentrationBackwardF32' in lowered
  got = jax.value_and_grad(fn)(psi)
  want = jax.value_and_grad(losses.spatial_concentration)(psi)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-9)


def test_spatial_concentration_kernel_rejects_what_it_cannot_compute():
  with pytest.raises(ValueError, match=r'rank 4 \[B, H, W, C\]; got shape \(2, 3, 4\)'):
    cpu_kernels.spatial_concentration_maps(jnp.zeros((2, 3, 4)))
  with pytest.raises(TypeError, match='float32 or float64 values; got float16'):
    cpu_kernels.spatial_concentration_maps(jnp.zeros((1, 2, 2, 1), jnp.float16))


# ----------------------------------------------------------------------------
# The build.
# ----------------------------------------------------------------------------


def test_build_is_cached_and_keyed_by_the_source(tmp_path):
  library = cpu_kernels.build(tmp_path)
  assert library.parent == tmp_path and library.stat().st_size > 0
  built_at = library.stat().st_mtime_ns
  assert cpu_kernels.build(tmp_path) == library and library.stat().st_mtime_ns == built_at
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.building-')]  # no leftovers
  sources = tmp_path / 'csrc'
  shutil.copytree(cpu_kernels.SOURCE_DIR, sources)
  assert cpu_kernels.build(tmp_path, source_dir=sources) == library  # same sources, same build
  (sources / 'parallel_for.h').write_text((sources / 'parallel_for.h').read_text() + '// changed\n')
  assert cpu_kernels.build(tmp_path, source_dir=sources) != library  # a changed header: rebuilt


def test_a_failed_build_names_the_command_and_leaves_nothing(tmp_path):
  (tmp_path / 'csrc').mkdir()
  (tmp_path / 'csrc' / 'broken.cc').write_text('this is not C++;\n')
  with pytest.raises(cpu_kernels.KernelBuildError, match=r'(?s)failed \(exit \d+\).*broken\.cc'):
    cpu_kernels.build(tmp_path / 'cache', source_dir=tmp_path / 'csrc')
  assert os.listdir(tmp_path / 'cache') == []  # the half-written output was removed
  with pytest.raises(cpu_kernels.KernelBuildError, match='cannot run the C\\+\\+ compiler'):
    cpu_kernels.build(tmp_path / 'cache', compiler=str(tmp_path / 'no-such-compiler'))


def test_without_a_compiler_one_warning_and_auto_picks_the_loop(tmp_path, python_subprocess):
  """A fresh process whose $CXX does not exist and whose cache is empty."""
  proc = python_subprocess("""
      import logging
      import jax, jax.numpy as jnp, numpy as np
      from cgl_jax import kernels, losses
      from cgl_jax.kernels import cpu
      logging.basicConfig(level=logging.WARNING)
      assert not cpu.available() and not cpu.available() and not kernels.available('cpu_ffi')
      selection = kernels.select('cpu', num_devices=1, dtype=jnp.float32)
      assert (selection.pair_sums, selection.per_map) == ('loop', 'jnp'), selection
      try:
        kernels.pair_sums('cpu_ffi')
      except kernels.KernelUnavailableError as error:
        print('unavailable:', error)
      psi = jnp.asarray(np.random.default_rng(7).uniform(0, 1, (2, 4, 4, 6)), jnp.float32)
      key = jax.random.key(0)
      loop = losses.group_coherence(psi, 2, pairs='sampled', key=key,
                                    pair_sums=kernels.pair_sums(selection.pair_sums))
      np.testing.assert_allclose(loop, losses.group_coherence(psi, 2, pairs='sampled', key=key),
                                 rtol=1e-6)
  """, env={'CXX': str(tmp_path / 'no-such-compiler'),
            'CGL_JAX_KERNEL_CACHE': str(tmp_path / 'cache')})
  assert proc.stderr.count('the C++ CPU kernels for L_g and L_s are unavailable') == 1
  assert 'cannot run the C++ compiler' in proc.stderr
  assert "unavailable: the 'cpu_ffi' kernels did not build or load here" in proc.stdout
  assert not (tmp_path / 'cache').exists() or not os.listdir(tmp_path / 'cache')
