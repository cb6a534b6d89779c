"""cgl_jax.losses with `axis_name` on 8 simulated CPU devices (all kernels), and its imports.

Each test runs in a subprocess (conftest.run_python): the device count must be
set before jax is imported.
"""
import json

from conftest import run_python

_DISTRIBUTED = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cgl_jax import kernels, losses

assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
# 16 images over 8 devices (2 each); 11 channels, G = 3 (f = 3, 2 free).
preact = jnp.asarray(rng.normal(0.2, 1.5, (16, 4, 5, 11)), jnp.float32)
psi = losses.soft_masks(preact)
key = jax.random.PRNGKey(7)
variants = {
    f'{pairs}-{reduction}': dict(pairs=pairs, reduction=reduction,
                                 **({'key': key} if pairs == 'sampled' else {}))
    for pairs in losses.PAIRS for reduction in losses.REDUCTIONS}

def coherence(x, axis_name=None, **options):
  return losses.group_coherence(x, 3, axis_name=axis_name, **options)

def max_error(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))

errors = {}
# pmap: leading device axis.
shards = lambda x: x.reshape(8, 2, *x.shape[1:])
got = jax.pmap(lambda a: losses.soft_masks(a, axis_name='i'), axis_name='i')(shards(preact))
errors['pmap/soft_masks'] = max_error(got.reshape(psi.shape), psi)
for name, options in variants.items():
  got = jax.pmap(lambda x: coherence(x, 'i', **options), axis_name='i')(shards(psi))
  errors[f'pmap/{name}'] = max_error(got, jnp.broadcast_to(coherence(psi, **options), (8, 3)))

# shard_map over a 1-D mesh, batch split over 'data', results replicated.
mesh = jax.make_mesh((8,), ('data',))
batch_sharding = NamedSharding(mesh, P('data'))
preact_sharded, psi_sharded = jax.device_put((preact, psi), batch_sharding)
def sharded(fn, out_specs):
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P('data'), out_specs=out_specs))
got = sharded(lambda a: losses.soft_masks(a, axis_name='data'), P('data'))(preact_sharded)
errors['shard_map/soft_masks'] = max_error(got, psi)
for name, options in variants.items():
  got = sharded(lambda x: coherence(x, 'data', **options), P())(psi_sharded)
  errors[f'shard_map/{name}'] = max_error(got, coherence(psi, **options))
  # Gradients flow through the cross-device sums as on one device.
  loss = lambda x: coherence(x, 'data', **options).sum()
  got = jax.jit(jax.grad(jax.shard_map(loss, mesh=mesh, in_specs=P('data'),
                                       out_specs=P())))(psi_sharded)
  want = jax.grad(lambda x: coherence(x, **options).sum())(psi)
  errors[f'shard_map/grad/{name}'] = max_error(got, want)
# Every implementation of the sampled pair sums and of L_s under shard_map, value and gradient.
for name in kernels.PAIR_SUMS:
  if not kernels.available(name):
    continue
  pair_sums = kernels.pair_sums(name, interpret=name == 'pallas')
  # Pallas' interpreter (not its compiled kernels) fails shard_map's check of varying axes.
  check_vma = name != 'pallas'
  for reduction in losses.REDUCTIONS:
    options = dict(pairs='sampled', key=key, reduction=reduction, pair_sums=pair_sums)
    want = coherence(psi, **variants[f'sampled-{reduction}'])
    got = jax.jit(jax.shard_map(lambda x: coherence(x, 'data', **options), mesh=mesh,
                                in_specs=P('data'), out_specs=P(), check_vma=check_vma))(
                                    psi_sharded)
    errors[f'shard_map/{name}/sampled-{reduction}'] = max_error(got, want)
    loss = lambda x: coherence(x, 'data', **options).sum()
    got = jax.jit(jax.grad(jax.shard_map(loss, mesh=mesh, in_specs=P('data'),
                                         out_specs=P(), check_vma=check_vma)))(psi_sharded)
    want = jax.grad(lambda x: coherence(x, **variants[f'sampled-{reduction}']).sum())(psi)
    errors[f'shard_map/grad/{name}/sampled-{reduction}'] = max_error(got, want)
for name in kernels.PER_MAP:
  if not kernels.available(name):
    continue
  per_map = kernels.per_map(name)
  def concentration(x):
    return jax.lax.pmean(losses.spatial_concentration(x, per_map=per_map), 'data')
  got = sharded(concentration, P())(psi_sharded)
  errors[f'shard_map/{name}/spatial_concentration'] = max_error(
      got, losses.spatial_concentration(psi))
  got = jax.jit(jax.grad(jax.shard_map(concentration, mesh=mesh, in_specs=P('data'),
                                       out_specs=P())))(psi_sharded)
  errors[f'shard_map/grad/{name}/spatial_concentration'] = max_error(
      got, jax.grad(losses.spatial_concentration)(psi))
errors['available'] = [name for name in kernels.PAIR_SUMS if kernels.available(name)]
# End to end: soft masks and coherence of the global batch from raw pre-activations.
got = sharded(lambda a: coherence(losses.soft_masks(a, axis_name='data'), 'data'), P())(preact_sharded)
errors['shard_map/soft_masks+exact'] = max_error(got, coherence(psi))
# L_s is a mean of per-image values: pmean of the shards' values is the global one.
got = sharded(lambda x: jax.lax.pmean(losses.spatial_concentration(x), 'data'), P())(psi_sharded)
errors['shard_map/spatial_concentration'] = max_error(got, losses.spatial_concentration(psi))
print(json.dumps(errors))
"""


def test_axis_name_statistics_equal_the_full_batch_on_8_devices():
  proc = run_python(_DISTRIBUTED, num_devices=8)
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  available = errors.pop('available')
  assert set(available) >= {'jnp', 'loop', 'matmul', 'pallas'}, available
  per_map = 2 if 'cpu_ffi' in available else 1
  # 2 × soft_masks, 3 × 4 coherence variants, 2 more; 4 per pair sums, 2 per L_s.
  assert len(errors) == 16 + 4 * len(available) + 2 * per_map, sorted(errors)
  failures = {name: error for name, error in errors.items() if not error <= 1e-5}
  assert not failures, failures


def test_import_pulls_in_neither_tensorflow_nor_flax():
  proc = run_python("""
      import sys
      import cgl_jax.losses
      heavy = sorted(name for name in sys.modules
                     if name.split('.')[0] in ('tensorflow', 'flax', 'tensorflow_datasets',
                                               'optax', 'orbax', 'clu'))
      ours = sorted(name for name in sys.modules if name.startswith('cgl_jax'))
      print(heavy, ours)
      assert not heavy, heavy
      assert ours == ['cgl_jax', 'cgl_jax.losses'], ours
  """)
  assert "[] ['cgl_jax', 'cgl_jax.losses']" in proc.stdout
