"""Tests of cgl_jax.models: shapes, sown pre-activations, conv_layers paths, bf16, registry."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import default_config, models, tree_util
from cgl_jax.models import layers

NUM_CLASSES = 7
BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
  """One small model configuration and what its forward pass must produce."""
  name: str
  kwargs: dict
  image_size: int
  # (sown name, spatial side of the sown map), in forward order.
  expected_maps: tuple
  batch_norm: bool


def _resnet_maps(stem_side, stage_sides):
  maps = [('stem', stem_side)]
  for stage, side in enumerate(stage_sides, start=1):
    for block in (0, 1):
      maps += [(f'layer{stage}_block{block}_conv{index}', side) for index in (1, 2)]
      if stage > 1 and block == 0:
        maps.append((f'layer{stage}_block0_shortcut', side))
  return tuple(maps)


_SMALL = dict(width_multiplier=0.125, hidden_features=16)
CASES = {
    'shapes_cnn': Case('shapes_cnn', dict(widths=(8, 16)), 16,
                       (('conv1', 16), ('conv2', 8)), False),
    # 224 → 55 → pool 27 → 27 → pool 13 → 13, 13, 13 (torchvision AlexNet sizes).
    'alexnet_bn': Case('alexnet_bn', _SMALL, 224,
                       tuple(zip(('conv1', 'conv2', 'conv3', 'conv4', 'conv5'),
                                 (55, 27, 13, 13, 13))), True),
    # 67 → 16 → pool 7 → 7 → pool 3 → 3, 3, 3 → pool 1 → adaptive pool 1 → 6×6 (upsampling).
    'alexnet': Case('alexnet', _SMALL, 67,
                    tuple(zip(('conv1', 'conv2', 'conv3', 'conv4', 'conv5'), (16, 7, 3, 3, 3))),
                    False),
    'vgg16': Case('vgg16', _SMALL, 32,
                  tuple((f'conv{stage}_{index}', 32 >> (stage - 1))
                        for stage, count in zip(range(1, 6), (2, 2, 3, 3, 3))
                        for index in range(1, count + 1)), False),
    'resnet18_cifar': Case('resnet18', dict(stem='cifar', width_multiplier=0.125), 16,
                           _resnet_maps(16, (16, 8, 4, 2)), True),
    # 64 → stem /2 32 → maxpool /2 16 → 16, 8, 4, 2.
    'resnet18_imagenet': Case('resnet18', dict(stem='imagenet', width_multiplier=0.125), 64,
                              _resnet_maps(32, (16, 8, 4, 2)), True),
}


def _eval_shapes(model, case, dtype=jnp.float32):
  """(variables, logits, intermediates) as ShapeDtypeStructs: traces, computes nothing."""
  images = jax.ShapeDtypeStruct((BATCH, case.image_size, case.image_size, 3), dtype)

  def forward(images):
    variables = model.init(jax.random.key(0), images, train=False)
    logits, state = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)},
                                mutable=['intermediates', 'batch_stats'])
    return variables, logits, models.get_intermediates(state)

  return jax.eval_shape(forward, images)


@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
def test_sown_names_and_shapes(case):
  model = models.create(case.name, num_classes=NUM_CLASSES, **case.kwargs)
  _, logits, intermediates = _eval_shapes(model, case)
  assert (logits.shape, logits.dtype) == ((BATCH, NUM_CLASSES), jnp.float32)
  conv_layers = model.conv_layers()
  assert [layer.name for layer in conv_layers] == [name for name, _ in case.expected_maps]
  want = {layer.name: (BATCH, side, side, layer.features)
          for layer, (_, side) in zip(conv_layers, case.expected_maps)}
  assert {name: value.shape for name, value in intermediates.items()} == want


# The full forward pass is compiled for these (the ImageNet-stem ResNet only differs in the stem,
# whose shapes `test_sown_names_and_shapes` covers).
COMPUTED_CASES = [name for name in CASES if name != 'resnet18_imagenet']


@pytest.fixture(scope='module', params=COMPUTED_CASES)
def built(request):
  """(case, model, variables, images, logits, intermediates) of one train-mode forward pass."""
  case = CASES[request.param]
  model = models.create(case.name, num_classes=NUM_CLASSES, **case.kwargs)
  images = jax.random.normal(jax.random.key(1), (BATCH, case.image_size, case.image_size, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)

  @jax.jit
  def forward(variables, images):
    logits, state = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)},
                                mutable=['intermediates', 'batch_stats'])
    return logits, models.get_intermediates(state)

  logits, intermediates = forward(variables, images)
  return case, model, variables, images, logits, intermediates


def test_logits_shape_and_dtype(built):
  _, _, _, _, logits, _ = built
  assert logits.shape == (BATCH, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_conv_layers_match_params_and_sown_values(built):
  case, model, variables, _, _, intermediates = built
  conv_layers = model.conv_layers()
  assert {layer.name for layer in conv_layers} == set(intermediates)
  params = variables['params']
  param = lambda path: tree_util.lookup(params, path, what='params')
  for layer in conv_layers:
    kernel = param(layer.kernel_path)
    assert kernel.ndim == 4 and kernel.shape[0] == kernel.shape[1], layer
    assert kernel.shape[3] == layer.features == intermediates[layer.name].shape[-1], layer
    assert kernel.dtype == jnp.float32
    if case.batch_norm:
      assert param(layer.bn_scale_path).shape == (layer.features,), layer
    else:
      assert layer.bn_scale_path is None
  # Every conv kernel in the params is described (R_bn must reach all of them).
  kernel_paths = {tuple(k.key for k in path[:-1]) + ('kernel',)
                  for path, _ in jax.tree_util.tree_leaves_with_path(params)
                  if path[-1].key == 'kernel' and param([k.key for k in path]).ndim == 4}
  assert kernel_paths == {layer.kernel_path for layer in conv_layers}


def test_batch_norm_models_sow_the_normalised_output(built):
  """In train mode the sown BN output with γ = 1, β = 0 (init) has per-channel mean 0, var 1."""
  case, _, variables, _, _, intermediates = built
  if not case.batch_norm:
    pytest.skip('no batch norm')
  assert 'batch_stats' in variables
  for name, value in intermediates.items():
    value = np.asarray(value, np.float64)
    np.testing.assert_allclose(value.mean(axis=(0, 1, 2)), 0.0, atol=1e-4, err_msg=name)
    var = value.var(axis=(0, 1, 2))
    # BN divides by √(var + 1e-5); channels that are constant (var 0) stay 0.
    assert np.all((np.abs(var - 1) < 2e-2) | (var < 1e-6)), (name, var)


def test_sown_values_are_pre_activations(built):
  _, _, _, _, _, intermediates = built
  for name, value in intermediates.items():
    assert np.min(value) < 0, f'{name} looks post-ReLU (no negative entries)'


def test_bfloat16_compute_keeps_float32_params_and_logits(built):
  case, model, variables, images, logits_f32, _ = built
  model_bf16 = models.create(case.name, num_classes=NUM_CLASSES, dtype='bfloat16', **case.kwargs)
  params_shapes = jax.eval_shape(lambda x: model_bf16.init(jax.random.key(0), x, train=False),
                                 images)
  assert {leaf.dtype for leaf in jax.tree.leaves(params_shapes)} == {jnp.dtype(jnp.float32)}
  logits, state = jax.jit(lambda v, x: model_bf16.apply(
      v, x, train=True, rngs={'dropout': jax.random.key(2)},
      mutable=['intermediates', 'batch_stats']))(variables, images)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  intermediates = models.get_intermediates(state)
  assert {v.dtype for v in intermediates.values()} == {jnp.dtype(jnp.bfloat16)}
  # Same function up to bf16 rounding (8 mantissa bits, accumulated over ≤ 20 layers).
  scale = np.max(np.abs(logits_f32))
  np.testing.assert_allclose(logits, logits_f32, atol=0.1 * scale)


def test_shapes_cnn_matches_a_numpy_reference():
  """conv1 = correlation of the zero-padded input with kernel + bias; conv2 on its pooled ReLU."""
  model = models.create('shapes_cnn', num_classes=3, widths=(4, 5))
  images = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), np.float64)
  variables = model.init(jax.random.key(1), images, train=False)
  logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  sown = models.get_intermediates(state)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), variables['params'])

  def conv3x3(x, kernel, bias):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = x.shape[1:3]
    return bias + sum(np.einsum('bhwc,cf->bhwf', padded[:, dy:dy + height, dx:dx + width],
                                kernel[dy, dx]) for dy in range(3) for dx in range(3))

  conv1 = conv3x3(images, params['conv1']['kernel'], params['conv1']['bias'])
  pooled = np.maximum(conv1, 0).reshape(2, 4, 2, 4, 2, 4).max(axis=(2, 4))
  conv2 = conv3x3(pooled, params['conv2']['kernel'], params['conv2']['bias'])
  want_logits = np.maximum(conv2, 0).mean(axis=(1, 2)) @ params['head']['kernel'] + \
      params['head']['bias']
  np.testing.assert_allclose(sown['conv1'], conv1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sown['conv2'], conv2, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)


# torchvision parameter counts at num_classes=1000 (sum of p.numel() over model.parameters()).
@pytest.mark.parametrize('name, kwargs, count', [
    ('alexnet', {}, 61_100_840),
    ('vgg16', {}, 138_357_544),
    ('resnet18', {'stem': 'imagenet'}, 11_689_512),
])
def test_full_size_parameter_counts_match_torchvision(name, kwargs, count):
  model = models.create(name, num_classes=1000, **kwargs)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params'])) == count


def test_full_size_conv_widths():
  widths = lambda name, **kw: [layer.features for layer in  # noqa: E731
                               models.create(name, num_classes=10, **kw).conv_layers()]
  assert widths('shapes_cnn') == [128, 256]
  assert widths('alexnet') == widths('alexnet_bn') == [64, 192, 384, 256, 256]
  assert widths('vgg16') == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
  resnet = models.create('resnet18', num_classes=10, stem='cifar').conv_layers()
  assert len(resnet) == 1 + 16 + 3
  assert {layer.name: layer.features for layer in resnet}['layer4_block1_conv2'] == 512
  assert models.create('alexnet_bn', num_classes=10).conv_layers()[2] == models.ConvLayer(
      'conv3', ('conv3', 'kernel'), 384, ('conv3', 'bn', 'scale'))


def test_dropout_is_active_only_in_training():
  model = models.create('alexnet', num_classes=3, **_SMALL)
  images = jnp.ones((2, 67, 67, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  apply = jax.jit(lambda key, train: model.apply(variables, images, train=train,
                                                 rngs={'dropout': key}), static_argnums=1)
  np.testing.assert_array_equal(apply(jax.random.key(1), False), apply(jax.random.key(2), False))
  assert not np.allclose(apply(jax.random.key(1), True), apply(jax.random.key(2), True))


def test_create_unknown_name_lists_available_models():
  with pytest.raises(ValueError) as error:
    models.create('lenet', num_classes=10)
  assert str(error.value) == ("Unknown model 'lenet'; available models: alexnet, alexnet_bn, "
                              'resnet18, shapes_cnn, vgg16')
  assert models.available() == ('alexnet', 'alexnet_bn', 'resnet18', 'shapes_cnn', 'vgg16')


def test_create_rejects_unknown_options():
  with pytest.raises(ValueError, match=r"Model 'alexnet_bn' \(AlexNet\) has no option\(s\) "
                                       r"\['stem'\]; its options are \['dropout_rate', 'dtype', "
                                       r"'hidden_features', 'initializer', 'num_classes', "
                                       r"'width_multiplier'\]"):
    models.create('alexnet_bn', num_classes=10, stem='cifar')
  with pytest.raises(ValueError, match="stem must be one of .*got 'tiny'"):
    models.create('resnet18', num_classes=10, stem='tiny')


def test_get_intermediates_errors():
  with pytest.raises(KeyError, match="no 'intermediates' collection"):
    models.get_intermediates({'batch_stats': {}})
  twice = {'intermediates': {'conv1': {layers.SOWN_KEY: (1, 2)}}}
  with pytest.raises(ValueError, match="'conv1' was sown 2 times"):
    models.get_intermediates(twice)


@pytest.mark.parametrize('in_size, out_size, windows', [
    (5, 3, [(0, 2), (1, 4), (3, 5)]),  # overlapping windows
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # upsampling repeats inputs
    (6, 6, [(i, i + 1) for i in range(6)]),  # identity
])
def test_adaptive_avg_pool_uses_torch_windows(in_size, out_size, windows):
  x = np.random.default_rng(0).normal(size=(1, in_size, in_size, 2)).astype(np.float32)
  want = np.array([[x[0, h0:h1, w0:w1].mean(axis=(0, 1)) for w0, w1 in windows]
                   for h0, h1 in windows])
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), out_size)[0], want,
                             rtol=1e-6)


def test_from_config_builds_the_configured_model():
  config = default_config.get_config()
  config.model.name = 'resnet18'
  config.model.kwargs.stem = 'cifar'
  config.model.dtype = 'bfloat16'
  config.dataset.num_classes = 7
  model = models.from_config(config)
  assert isinstance(model, models.ResNet18)
  assert (model.stem, model.num_classes, model.dtype) == ('cifar', 7, jnp.bfloat16)
  config.model.kwargs.depth = 3
  with pytest.raises(ValueError,
                     match=r"Model 'resnet18' \(ResNet18\) has no option\(s\) \['depth'\]"):
    models.from_config(config)


def test_shapes_cnn_pytorch_initializer_is_pytorchs_default_for_conv_and_linear():
  """initializer='pytorch': every kernel and bias ~ U(±1/√fan_in), fan_in = 3·3·C_in for the
  convs and the input width for the head (PyTorch's kaiming_uniform(a=√5) and bias default)."""
  model = models.create('shapes_cnn', num_classes=2, initializer='pytorch')
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)['params']
  fan_in = {'conv1': 3 * 3 * 3, 'conv2': 3 * 3 * 128, 'head': 256}
  for layer, fan in fan_in.items():
    bound = 1 / math.sqrt(fan)
    for name in ('kernel', 'bias'):
      values = np.asarray(params[layer][name]).ravel()
      assert np.all(np.abs(values) <= bound), (layer, name)
      if values.size >= 128:  # uniform on (−b, b): reaches both ends, variance b²/3
        assert values.max() > 0.95 * bound and values.min() < -0.95 * bound, (layer, name)
        assert np.var(values) == pytest.approx(bound ** 2 / 3, rel=0.15), (layer, name)
  default = models.create('shapes_cnn', num_classes=2).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)['params']
  assert not np.any(default['conv1']['bias']) and not np.any(default['head']['bias'])
  he_std = math.sqrt(2 / (3 * 3 * 128))  # He-normal, fan_out = 3·3·C_out
  assert np.std(default['conv1']['kernel']) == pytest.approx(he_std, rel=0.1)


def test_unknown_initializer_is_named():
  model = models.create('shapes_cnn', num_classes=2, initializer='xavier')
  with pytest.raises(ValueError, match=r"config.model.kwargs.initializer must be one of "
                                       r"\('he_normal', 'pytorch'\), got 'xavier'"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)


@pytest.mark.parametrize('name, kwargs, image, fan_in', [
    ('alexnet', dict(width_multiplier=0.25, hidden_features=32), 64,
     {'conv1': 11 * 11 * 3, 'conv2': 5 * 5 * 16, 'fc2': 32, 'head': 32}),
    ('vgg16', dict(width_multiplier=0.125, hidden_features=16), 32,
     {'conv1_1': 3 * 3 * 3, 'conv5_3': 3 * 3 * 64, 'fc1': 64 * 7 * 7, 'head': 16}),
])
def test_alexnet_and_vgg_take_the_pytorch_initializer(name, kwargs, image, fan_in):
  model = models.create(name, num_classes=3, initializer='pytorch', **kwargs)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, image, image, 3)), train=False)[
      'params']
  for layer, fan in fan_in.items():
    bound = 1 / math.sqrt(fan)
    kernel, bias = (np.asarray(params[layer][n]).ravel() for n in ('kernel', 'bias'))
    assert np.all(np.abs(kernel) <= bound) and np.all(np.abs(bias) <= bound), layer
    assert np.abs(kernel).max() > 0.9 * bound and np.any(bias), layer
