"""Dissection numerics: the streaming quantile vs numpy, and the IoU tally vs hand-computed values
and vs the straightforward NumPy port of NetDissect-Lite (cgl_jax/dissect/reference.py)."""
import functools
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax.data import broden
from cgl_jax.dissect import quantile, reference, tally


def _stream(x, batch):
  def batches():
    for start in range(0, len(x), batch):
      chunk = x[start:start + batch]
      yield chunk, np.ones(len(chunk), bool)
  return batches


_DISTRIBUTIONS = {
    'normal': lambda rng: rng.standard_normal((4999, 6)),
    'ties': lambda rng: np.round(rng.standard_normal((3001, 4)) * 3),  # many equal values
    'two_signs': lambda rng: np.concatenate([rng.exponential(size=(900, 3)),
                                             -rng.exponential(size=(900, 3))]),
    'relu_like': lambda rng: np.maximum(rng.standard_normal((2000, 3)), 0),  # ~half zeros
    'constant': lambda rng: np.full((50, 2), -1.5),
    'single': lambda rng: rng.standard_normal((1, 3)),
}


@pytest.mark.parametrize('name', sorted(_DISTRIBUTIONS))
@pytest.mark.parametrize('q', [0.005, 0.25, 0.5])
def test_exact_quantile_equals_numpy_bit_for_bit(name, q):
  x = _DISTRIBUTIONS[name](np.random.default_rng(1)).astype(np.float32)
  thresholds, bound = quantile.streaming_top_quantile(
      _stream(x, 256), num_units=x.shape[1], num_values=len(x), quantile=q)
  np.testing.assert_array_equal(thresholds, np.quantile(x, 1 - q, axis=0))
  assert not bound.any()


@pytest.mark.parametrize('bits', [(16, 16), (8, 8, 8, 8), (11, 11, 10)])
def test_exact_quantile_any_digit_schedule_and_batching(bits):
  x = np.random.default_rng(2).standard_normal((3000, 5)).astype(np.float32)
  thresholds, _ = quantile.streaming_top_quantile(
      _stream(x, 77), num_units=5, num_values=3000, quantile=0.005, bits_per_pass=bits)
  np.testing.assert_array_equal(thresholds, np.quantile(x, 0.995, axis=0))


def test_padded_rows_are_ignored():
  x = np.random.default_rng(3).standard_normal((1000, 4)).astype(np.float32)
  padded = np.concatenate([x, np.full((24, 4), 1e9, np.float32)])
  valid = np.arange(len(padded)) < len(x)
  thresholds, _ = quantile.streaming_top_quantile(
      lambda: [(padded, valid)], num_units=4, num_values=1000, quantile=0.01)
  np.testing.assert_array_equal(thresholds, np.quantile(x, 0.99, axis=0))


@pytest.mark.parametrize('values_per_chunk', [None, 40 * 4, 35 * 4])
def test_chunked_histogram_update_gives_the_same_state(values_per_chunk):
  # Chunks of 40 rows, and of 30 (the largest divisor of 1,200 rows with rows · 4 ≤ 35 · 4),
  # padded rows (valid=False) in the batch; every pass's state equals the unchunked one.
  x = np.random.default_rng(4).standard_normal((1200, 4)).astype(np.float32)
  valid = np.arange(1200) < 1100
  selector = quantile.TopQuantile(num_units=4, num_values=1100, quantile=0.005)
  state, unchunked = selector.init(), selector.init()
  for pass_index in range(selector.num_passes):
    options = dict(bits_per_pass=selector.bits_per_pass, pass_index=pass_index,
                   last_pass=pass_index + 1 == selector.num_passes)
    state = quantile.histogram_update(state, x, valid, values_per_chunk=values_per_chunk,
                                      **options)
    unchunked = quantile.histogram_update(unchunked, x, valid, **options)
    for got, want in zip(state, unchunked):
      np.testing.assert_array_equal(got, want)
    state = unchunked = selector.advance(state, pass_index=pass_index)
  np.testing.assert_array_equal(selector.thresholds(state),
                                np.quantile(x[:1100], 0.995, axis=0))


@pytest.mark.parametrize('name', ['normal', 'ties', 'two_signs', 'relu_like'])
def test_approximate_quantile_within_its_stated_bound(name):
  x = _DISTRIBUTIONS[name](np.random.default_rng(4)).astype(np.float32)
  q = 0.005
  estimate, bound = quantile.streaming_top_quantile(
      _stream(x, 500), num_units=x.shape[1], num_values=len(x), quantile=q, exact=False)
  exact = np.quantile(x, 1 - q, axis=0)
  assert np.all(np.abs(estimate - exact) <= bound)
  # The documented bound: half a 16-bit bin, ≤ 2^-8 of the order statistics' magnitude.
  k, k_next, _ = quantile.TopQuantile(num_units=1, num_values=len(x), quantile=q).ranks
  ordered = np.sort(x, axis=0)
  magnitude = np.maximum(np.abs(ordered[k]), np.abs(ordered[k_next]))
  assert np.all(bound <= 2**-8 * magnitude + 2 * np.spacing(np.abs(estimate)) + 1e-37)


def test_quantile_memory_does_not_grow_with_the_stream():
  selector = quantile.TopQuantile(num_units=8, num_values=1, quantile=0.005)
  update = jax.jit(selector.update, static_argnames='pass_index')
  state_bytes = lambda s: sum(leaf.nbytes for leaf in jax.tree.leaves(s))

  def run(num_batches):
    rng = np.random.default_rng(5)
    state = selector.init()
    tracemalloc.start()
    for _ in range(num_batches):  # a generator: each batch is dropped after its update
      # Blocking keeps async dispatch from holding a load-dependent number of host batches.
      state = jax.block_until_ready(update(
          state, rng.standard_normal((4096, 8)).astype(np.float32), None, pass_index=0))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return state, peak

  few, peak_few = run(10)
  many, peak_many = run(80)  # keeping the 70 extra batches of 128 KiB would add 9 MB
  assert state_bytes(few) == state_bytes(many) == 8 * (2**16 + 3) * 4
  assert peak_many < peak_few + 1_500_000  # slack for jit caches


def test_quantile_rejects_bad_arguments():
  with pytest.raises(ValueError, match='quantile must be in'):
    quantile.TopQuantile(num_units=1, num_values=10, quantile=1.5)
  with pytest.raises(ValueError, match='sum to 32'):
    quantile.TopQuantile(num_units=1, num_values=10, quantile=0.1, bits_per_pass=(16, 8))


# ----------------------------------------------------------------------------------------------
# The tally.


def _hand_fixture(tmp_path):
  """3 images of 2×3 pixels; colour per pixel (red=1, blue=2), scene per image (beach=3,
  forest=4); two units whose activation masks are written out below."""
  colour = np.array([[[1, 1, 0], [0, 0, 2]],
                     [[0, 0, 0], [0, 0, 0]],
                     [[2, 2, 2], [0, 0, 0]]])
  directory = broden.write_broden(
      str(tmp_path / 'hand'), images=np.zeros((3, 2, 3, 3), np.uint8),
      concepts=[('red', 'colour'), ('blue', 'colour'), ('beach', 'scene'), ('forest', 'scene')],
      pixel_labels={'colour': colour}, image_labels={'scene': [[3], [], [4]]})
  unit_a = np.array([[[1, 0, 0], [0, 0, 0]],
                     [[1, 1, 0], [0, 0, 0]],
                     [[0, 0, 0], [1, 1, 1]]])
  unit_b = np.array([[[0, 0, 0], [0, 0, 0]],
                     [[0, 0, 0], [0, 0, 0]],
                     [[1, 1, 1], [0, 0, 0]]])
  return broden.Broden(directory), np.stack([unit_a, unit_b], axis=-1).astype(np.float32)


def _tally_all(activations, thresholds, batch, category_onehot, images_per_step=1):
  step = jax.jit(functools.partial(tally.tally_batch, category_onehot=jnp.asarray(category_onehot),
                                   images_per_step=images_per_step))
  return tally.TallyCounts(*map(np.asarray, step(
      activations, thresholds, batch['pixel_labels'], batch['image_labels'],
      np.ones(len(activations), bool))))


def test_tally_equals_hand_computed_counts_and_iou(tmp_path):
  data, activations = _hand_fixture(tmp_path)
  batch = next(data.batches(batch_size=3))
  onehot = tally.category_onehot(data.primary_category_index(), len(data.categories))
  counts = _tally_all(activations, np.float32([0.5, 0.5]), {
      'pixel_labels': batch['pixel_labels']['colour'],
      'image_labels': batch['image_labels']['scene']}, onehot)
  # label areas: red 2 px, blue 1 + 3 px, beach and forest one whole image (6 px) each.
  np.testing.assert_array_equal(counts.labels, [0, 2, 4, 6, 6])
  np.testing.assert_array_equal(counts.units, [6, 3])
  # Unit A: red ∩ = 1 (image 0), beach ∩ = all of image 0's 1 px, forest ∩ = image 2's 3 px.
  np.testing.assert_array_equal(counts.both, [[0, 1, 0, 1, 3], [0, 0, 3, 0, 3]])
  # Category-touch rule: unit A's pixels count for 'colour' only in image 0 (1 px: image 1 has
  # no labels, image 2's mask misses the blue row); for 'scene' in images 0 and 2 (1 + 3 px).
  np.testing.assert_array_equal(counts.units_cat, [[1, 4], [3, 3]])
  iou = tally.iou(counts, data.primary_category_index())
  expected = np.array([[0, 1 / (1 + 2 - 1), 0 / (1 + 4), 1 / (4 + 6 - 1), 3 / (4 + 6 - 3)],
                       [0, 0 / (3 + 2), 3 / (3 + 4 - 3), 0 / (3 + 6), 3 / (3 + 6 - 3)]])
  np.testing.assert_allclose(iou, expected, rtol=1e-9)
  concepts = tally.unit_concepts(iou, data.primary_category_index(), 2)
  assert data.label_names()[concepts.label[0]] == 'red' and concepts.score[0] == pytest.approx(0.5)
  assert data.label_names()[concepts.label[1]] == 'blue'
  np.testing.assert_array_equal(concepts.category_label, [[1, 4], [2, 4]])
  summary = tally.detector_summary(concepts, threshold=0.6, categories=data.categories,
                                   label_names=data.label_names())
  assert summary['detectors'] == 1 and summary['detectors_per_concept'] == {'blue': 1}
  assert summary['unique_detectors_per_category'] == {'colour': 1, 'scene': 0}


def test_units_without_a_match_are_labelled_as_the_reference_does():
  """NetDissect-Lite takes, per category, the argmax over ALL label ids of the IoUs masked to
  the category (label 0 when they are all 0), and the unit's category as the first of a reversed
  ascending sort (the LAST of tied categories). A unit that matches nothing: label 0 (named ''),
  score 0, the last category."""
  primary = np.array([-1, 0, 0, 1, 1, 2])
  iou = np.array([[0, 0.0, 0.0, 0.0, 0.0, 0.0],   # matches nothing
                  [0, 0.2, 0.3, 0.0, 0.0, 0.0],   # colour only
                  [0, 0.1, 0.0, 0.1, 0.1, 0.1]])  # a tie across all three categories
  concepts = tally.unit_concepts(iou, primary, 3)
  np.testing.assert_array_equal(concepts.category_label, [[0, 0, 0], [2, 0, 0], [1, 3, 5]])
  np.testing.assert_array_equal(concepts.label, [0, 2, 5])
  np.testing.assert_array_equal(concepts.category, [2, 0, 2])
  np.testing.assert_array_equal(concepts.score, [0, 0.3, 0.1])
  # The reference's own expressions (feature_operation.py, FeatureOperator.tally):
  reference_primary = np.where(primary < 0, 2, primary)  # label 0's primary: the last category
  pciou = np.array([iou * (reference_primary == ci)[None, :] for ci in range(3)])
  label_pciou = pciou.argmax(axis=2)
  score_pciou = pciou[np.arange(3)[:, None], np.arange(3)[None, :], label_pciou]
  bestcat = score_pciou.argsort(axis=0)[::-1][0]
  np.testing.assert_array_equal(label_pciou.T, concepts.category_label)
  np.testing.assert_array_equal(bestcat, concepts.category)


def test_tally_matches_numpy_reference_with_upsampling_layers_and_padding():
  """Random labels in 3 categories, 2 pixel layers, image-level ids, ×2 bilinear upsampling of
  integer maps (exact in float32, so both implementations see identical masks)."""
  rng = np.random.default_rng(0)
  n, units, h, seg, num_labels = 6, 5, 4, 8, 9
  activations = rng.integers(-4, 5, (n, h, h, units)).astype(np.float32)
  thresholds = rng.integers(-2, 3, units).astype(np.float32) + 0.1
  pixel = rng.integers(0, num_labels, (n, 2, seg, seg)).astype(np.int32)
  pixel[:, :, :3] = 0
  image = rng.integers(0, num_labels, (n, 2)).astype(np.int32)
  primary = np.array([-1, 0, 0, 0, 1, 1, 2, 2, 2])
  onehot = tally.category_onehot(primary, 3)
  expected = reference.tally(np.moveaxis(activations, 3, 1), thresholds, zip(pixel, image),
                             category_onehot=onehot)
  # Pad the batch to 8 with garbage marked invalid, scan 2 images per step.
  pad = lambda x: np.concatenate([x, np.ones((2,) + x.shape[1:], x.dtype) * 3])
  step = jax.jit(functools.partial(tally.tally_batch, category_onehot=jnp.asarray(onehot),
                                   images_per_step=2))
  ours = step(pad(activations), thresholds, pad(pixel), pad(image), np.arange(8) < n)
  for name, got, want in zip(tally.TallyCounts._fields, ours, expected):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
  assert expected.units_cat.min() < expected.units.max()  # the touch rule was exercised


def _pil_resize(maps, size, method):
  """[b, h, w, C] float32 → [b, sh, sw, C] with PIL, map by map."""
  return np.stack([np.stack([reference.upsample(maps[i, :, :, c], size, method)
                             for c in range(maps.shape[3])], -1) for i in range(len(maps))])


@pytest.mark.parametrize('method', tally.UPSAMPLING)
@pytest.mark.parametrize('shape,size', [((7, 5), (13, 11)), ((7, 5), (3, 2)), ((16, 16), (64, 64)),
                                        ((13, 13), (112, 112)), ((6, 6), (227, 227))])
def test_upsampling_equals_pil_bit_for_bit(maybe_jit, method, shape, size):
  """Up- and downsampling with each filter equal Image.fromarray(map, 'F').resize(...) exactly,
  on maps of very different scales and on a plateau."""
  rng = np.random.default_rng(6)
  maps = (rng.standard_normal((2, *shape, 3))
          * np.float32([1e-3, 1.0, 300.0])).astype(np.float32)
  maps[1, :3, :3, :] = 0.1
  ours = maybe_jit(functools.partial(tally.upsample, size=size, method=method))(maps)
  np.testing.assert_array_equal(np.asarray(ours), _pil_resize(maps, size, method))


@pytest.mark.parametrize('method', tally.UPSAMPLING)
def test_plateau_at_the_threshold_counts_as_pil_does(method):
  """A unit whose activations sit on a plateau exactly at T_k (a uniform background): the masks
  `map > T_k` depend on the last bit of the upsampled plateau. They equal PIL's, while the same
  interpolation done with float32 matrices disagrees with PIL on thousands of pixels."""
  rng = np.random.default_rng(0)
  plateau = np.float32(0.1)
  maps = np.full((2, 13, 13, 2), plateau, np.float32)
  maps[:, :6, :4] = rng.standard_normal((2, 6, 4, 2))
  thresholds = np.full(2, plateau)
  pixel = rng.integers(0, 4, (2, 1, 112, 112)).astype(np.int32)
  image = np.zeros((2, 1), np.int32)
  onehot = tally.category_onehot(np.array([-1, 0, 0, 1]), 2)
  expected = reference.tally(np.moveaxis(maps, 3, 1), thresholds, zip(pixel, image),
                             category_onehot=onehot, upsampling=method)
  step = jax.jit(functools.partial(tally.tally_batch, category_onehot=jnp.asarray(onehot),
                                   upsampling=method))
  ours = step(maps, thresholds, pixel, image, np.ones(2, bool))
  for name, got, want in zip(tally.TallyCounts._fields, ours, expected):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
  if method == 'bilinear':
    taps = tally.resample_taps(13, 112, 'bilinear')
    matrix = np.zeros((112, 13))
    np.add.at(matrix, (np.arange(112)[:, None], taps[0]), taps[1])
    matrix = matrix.astype(np.float32)
    float32_maps = np.einsum('ah,bg,ihwc->iabc', matrix, matrix, maps).astype(np.float32)
    assert np.sum(float32_maps > plateau) - expected.units.sum() > 1000


def test_bicubic_overshoot_of_a_map_below_the_threshold_is_ignored():
  """As the reference: a map whose raw maximum is ≤ T_k activates nothing, although bicubic
  ringing next to a step lifts some upsampled pixels above T_k."""
  maps = np.zeros((1, 4, 4, 1), np.float32)
  maps[0, :, 2:] = 1.0
  assert _pil_resize(maps, (16, 16), 'bicubic').max() > 1.0
  pixel = np.ones((1, 1, 16, 16), np.int32)
  step = jax.jit(functools.partial(tally.tally_batch, category_onehot=jnp.ones((2, 1)),
                                   upsampling='bicubic'))
  counts = step(maps, np.float32([1.0]), pixel, np.zeros((1, 1), np.int32), np.ones(1, bool))
  assert int(counts.units[0]) == 0
  counts = step(maps, np.float32([0.99]), pixel, np.zeros((1, 1), np.int32), np.ones(1, bool))
  assert int(counts.units[0]) > 0


def test_resample_taps_rejects_unknown_methods():
  with pytest.raises(ValueError, match=r"upsampling must be one of \('bilinear', 'nearest', "
                     r"'bicubic'\); got 'area'"):
    tally.resample_taps(4, 8, 'area')


def test_images_per_step_divides_batch_and_respects_budget():
  # 4·(4096·(256 + 16) + 256·16) B ≈ 4.5 MB per image: 57 fit in 256 MiB → divisor 32.
  assert tally.images_per_step(batch_size=64, pixels=4096, num_units=256, num_labels=16,
                               budget_bytes=1 << 28) == 32
  # Broden at 112²: 4·(12544·(512 + 1198) + 512·1198) B ≈ 88 MB per image → 2.
  assert tally.images_per_step(batch_size=64, pixels=112 * 112, num_units=512,
                               num_labels=1198, budget_bytes=1 << 28) == 2
  assert tally.images_per_step(batch_size=7, pixels=10**6, num_units=512, num_labels=1198) == 1
  # On CPU the default budget (8 MiB) keeps a step in cache: 1.3 MB per image → 4 of 64.
  assert tally.images_per_step(batch_size=64, pixels=4096, num_units=64, num_labels=16) == 4
