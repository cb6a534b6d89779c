"""cgl_jax.cpu_pair_l1: the C++ (XLA FFI) CPU kernels of L_g's pair sums, and their build.

The kernels are checked against the XLA loop they replace (the backward bit for
bit, since both walk the same filter-sorted incidences), against NumPy, for
thread-count independence, under vmap, and for the build's cache and failure
paths. `tests/test_losses.py` also runs every group-coherence test through them.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import cpu_pair_l1
from cgl_jax import losses

pytestmark = pytest.mark.skipif(not cpu_pair_l1.available(),
                                reason='the C++ CPU kernel does not build here (no compiler?)')


def _maps(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).uniform(0, 1, shape).astype(dtype)


def _vjp(pair_sums, maps, pairs, cotangent):
  value, pullback = jax.vjp(lambda m: pair_sums(m, pairs), maps)
  return value, pullback(cotangent)[0]


def _loop(maps, pairs):  # the XLA loop over filter-major maps, [..., f, N] → [..., r]
  return jnp.moveaxis(losses._filter_major_pair_l1(maps, pairs), 0, -1)


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
@pytest.mark.parametrize('shape, num_pairs', [
    ((3, 2, 6, 20), 7),       # N not a multiple of the 16 partial sums
    ((2, 5, 51, 1024), 153),  # ShapesCNN conv2's block size, r = 3f
    ((4, 7, 169), 16),        # AlexNet's 13×13, one leading axis
])
def test_value_and_gradient_match_the_xla_loop(shape, num_pairs, dtype, maybe_jit):
  with jax.enable_x64(dtype == 'float64'):
    maps = jnp.asarray(_maps(0, shape, dtype))
    maps = maps.at[..., 1, :].set(maps[..., 0, :])  # filters 0 and 1 tie: sign(0) = 0
    pairs = jnp.concatenate([jnp.array([[0, 1], [1, 0], [2, 3], [2, 3]], jnp.int32),
                             losses.sample_pairs(jax.random.key(1), shape[-2], num_pairs - 4)])
    cotangent = jax.random.normal(jax.random.key(2), (*shape[:-2], num_pairs), dtype)
    want_value, want_grad = _vjp(_loop, maps, pairs, cotangent)
    got_value, got_grad = maybe_jit(lambda m, c: _vjp(cpu_pair_l1.pair_l1, m, pairs, c))(
        maps, cotangent)
    assert got_value.dtype == got_grad.dtype == jnp.dtype(dtype)
    assert got_value.shape == want_value.shape and got_grad.shape == maps.shape
    # The forward sums in another order (16 partial sums) than XLA's reduction.
    np.testing.assert_allclose(got_value, want_value, rtol=1e-6 if dtype == 'float32' else 1e-13)
    np.testing.assert_array_equal(got_grad, want_grad)  # same incidences, same order
    by_hand = np.abs(np.asarray(maps)[..., pairs[:, 0], :]
                     - np.asarray(maps)[..., pairs[:, 1], :]).sum(-1)
    np.testing.assert_allclose(got_value, by_hand, rtol=1e-5 if dtype == 'float32' else 1e-12)


def test_non_finite_values_propagate_as_in_the_xla_loop():
  maps = jnp.asarray(_maps(3, (2, 4, 18)))
  maps = maps.at[0, 1, 5].set(jnp.nan).at[1, 2, 7].set(jnp.inf).at[1, 3, 7].set(jnp.inf)
  pairs = jnp.array([[0, 1], [2, 3], [3, 0], [1, 2]], jnp.int32)
  cotangent = jnp.array([[1.0, -2.0, 0.5, 3.0], [jnp.inf, 1.0, -1.0, 0.0]])
  want_value, want_grad = _vjp(_loop, maps, pairs, cotangent)
  got_value, got_grad = _vjp(cpu_pair_l1.pair_l1, maps, pairs, cotangent)
  np.testing.assert_array_equal(np.isnan(got_value), np.isnan(want_value))
  np.testing.assert_allclose(got_value, want_value, rtol=1e-6)  # nan == nan here
  np.testing.assert_array_equal(got_grad, want_grad)
  assert np.isnan(got_value[0, 0]) and np.isnan(got_grad[1, 2, 7])  # inf − inf; inf·sign(0)


def test_out_of_range_pair_indices_are_read_as_dynamic_slices_read_them():
  """No read outside the maps: an index counts from the end if negative, then is clamped.

  (`group_coherence` rejects such indices when it can see them; traced ones
  cannot be checked.) The gradient is that of the value so read.
  """
  maps = jnp.asarray(_maps(4, (2, 5, 9)))
  pairs = jnp.array([[-3, 2], [1, 9], [4, 0], [-9, 3]], jnp.int32)
  as_read = jnp.array([[2, 2], [1, 4], [4, 0], [0, 3]], jnp.int32)
  cotangent = jnp.ones((2, 4))
  got = _vjp(cpu_pair_l1.pair_l1, maps, pairs, cotangent)
  for got_part, want_part in zip(got, _vjp(_loop, maps, as_read, cotangent)):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-6)
  np.testing.assert_allclose(got[0], _loop(maps, pairs), rtol=1e-6)  # the loop reads alike


def test_vmap_runs_the_kernel_per_element():
  maps = jnp.asarray(_maps(5, (3, 2, 6, 20)))
  pairs = jnp.array([[0, 5], [3, 1]], jnp.int32)
  batched = jax.vmap(lambda m: cpu_pair_l1.pair_l1(m, pairs))(maps)
  np.testing.assert_array_equal(batched, cpu_pair_l1.pair_l1(maps, pairs))


def test_results_do_not_depend_on_the_thread_count(tmp_path, python_subprocess):
  """One XLA thread and the default pool give identical bits (each output has one owner)."""
  np.save(tmp_path / 'maps.npy', _maps(6, (16, 5, 51, 256)))
  code = f"""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from cgl_jax import cpu_pair_l1, losses
    maps = jnp.asarray(np.load({str(tmp_path / 'maps.npy')!r}))
    pairs = losses.sample_pairs(jax.random.key(1), 51, 153)
    value, pullback = jax.vjp(lambda m: cpu_pair_l1.pair_l1(m, pairs), maps)
    grad = pullback(jnp.cos(value))[0]
    np.save(os.environ['OUT'], np.concatenate([np.ravel(value), np.ravel(grad)]))
  """
  python_subprocess(code, env={'OUT': str(tmp_path / 'pool.npy')})
  python_subprocess(code, env={'OUT': str(tmp_path / 'one.npy'), 'XLA_FLAGS': (
      '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')})
  np.testing.assert_array_equal(np.load(tmp_path / 'pool.npy'), np.load(tmp_path / 'one.npy'))


def test_rejects_what_it_cannot_compute():
  with pytest.raises(TypeError, match='float32 or float64 maps; got bfloat16'):
    cpu_pair_l1.pair_l1(jnp.zeros((2, 3, 4), jnp.bfloat16), jnp.array([[0, 1]]))
  with pytest.raises(ValueError, match=r'pair_indices must have shape \[r, 2\]; got \(3,\)'):
    cpu_pair_l1.pair_l1(jnp.zeros((2, 3, 4)), jnp.array([0, 1, 2]))


# ----------------------------------------------------------------------------
# The build.
# ----------------------------------------------------------------------------


def test_build_is_cached_and_keyed_by_the_source(tmp_path, monkeypatch):
  library = cpu_pair_l1.build(tmp_path)
  assert library.parent == tmp_path and library.stat().st_size > 0
  built_at = library.stat().st_mtime_ns
  assert cpu_pair_l1.build(tmp_path) == library and library.stat().st_mtime_ns == built_at
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.building-')]  # no leftovers
  changed = tmp_path / 'changed.cc'
  changed.write_text(cpu_pair_l1.SOURCE.read_text() + '\n// changed\n')
  monkeypatch.setattr(cpu_pair_l1, 'SOURCE', changed)
  assert cpu_pair_l1.build(tmp_path) != library  # a new source is a new build


def test_a_failed_build_names_the_command_and_leaves_nothing(tmp_path, monkeypatch):
  broken = tmp_path / 'broken.cc'
  broken.write_text('this is not C++;\n')
  monkeypatch.setattr(cpu_pair_l1, 'SOURCE', broken)
  with pytest.raises(cpu_pair_l1.KernelBuildError, match=r'(?s)failed \(exit \d+\).*broken\.cc'):
    cpu_pair_l1.build(tmp_path / 'cache')
  assert os.listdir(tmp_path / 'cache') == []  # the half-written output was removed
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(cpu_pair_l1.KernelBuildError, match='cannot run the C\\+\\+ compiler'):
    cpu_pair_l1.build(tmp_path / 'cache')


def test_unavailable_kernel_warns_once_and_group_coherence_uses_the_loop(monkeypatch, caplog):
  psi = jnp.asarray(_maps(7, (2, 4, 4, 6)))
  key = jax.random.key(0)
  want = losses.group_coherence(psi, 2, pairs='sampled', key=key)

  def failing_register():
    raise cpu_pair_l1.KernelBuildError('no C++ compiler found (test)')

  monkeypatch.setattr(cpu_pair_l1, '_register', failing_register)
  cpu_pair_l1.available.cache_clear()
  losses._cpu_kernel_module.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not cpu_pair_l1.available() and not cpu_pair_l1.available()
    assert [r.getMessage() for r in caplog.records].count(
        caplog.records[0].getMessage()) == 1 and 'no C++ compiler found (test)' in caplog.text
    assert losses._cpu_kernel_module() is None
    # A fresh function: jit must trace again, now choosing the loop.
    got = jax.jit(lambda x: losses.group_coherence(x, 2, pairs='sampled', key=key))(psi)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    monkeypatch.setenv(cpu_pair_l1.DISABLE_ENV, '0')
    monkeypatch.setattr(cpu_pair_l1, '_register', lambda: None)
    cpu_pair_l1.available.cache_clear()
    assert not cpu_pair_l1.available()  # switched off: not even tried
  finally:
    cpu_pair_l1.available.cache_clear()
    losses._cpu_kernel_module.cache_clear()
