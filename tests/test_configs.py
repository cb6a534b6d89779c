"""Every config file loads for every variant, validates against its model, and says what it says."""
import itertools
import os

import pytest
from ml_collections import config_flags

from cgl_jax import default_config, models
from cgl_jax.config_validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGULARIZERS = ('cgl', 'baseline', 'rbn', 'cgl_orth')
# Config file → every option's tokens (any combination is a valid variant).
CONFIG_VARIANTS = {
    'shapes.py': (REGULARIZERS, ('small', 'paper'), ('binary', 'classes45'), ('full', 'tiny')),
    'cifar.py': (REGULARIZERS, ('cifar10', 'cifar100')),
    'places365_alexnet.py': (REGULARIZERS,),
    'places365_alexnet_bn.py': (REGULARIZERS,),
    'places365_vgg16.py': (REGULARIZERS,),
    'imagenet_alexnet.py': (REGULARIZERS,),
    'imagenet_vgg16.py': (REGULARIZERS,),
}


def load(name: str, variant: str | None = None):
  path = os.path.join(REPO, 'configs', name)
  return default_config.load_config_file(path if variant is None else f'{path}:{variant}')


def test_every_config_file_is_covered():
  files = {name for name in os.listdir(os.path.join(REPO, 'configs'))
           if name.endswith('.py') and name not in ('default.py', '__init__.py')}
  assert files == set(CONFIG_VARIANTS)


@pytest.mark.parametrize('name, variant', [
    (name, ','.join(tokens)) for name, options in CONFIG_VARIANTS.items()
    for tokens in itertools.product(*options)])
def test_variant_validates_against_its_model(name, variant):
  config = load(name, variant)
  layers = models.from_config(config).conv_layers()
  validate_config(config, conv_layers=layers, device_count=8)  # data-parallel ready
  row = variant.split(',')[0]
  lambdas = (config.cgl.lambda_bn, config.cgl.lambda_g, config.cgl.lambda_s, config.cgl.lambda_o)
  expected = {'baseline': (0, 0, 0, 0), 'rbn': (1e-3, 0, 0, 0), 'cgl': (1e-3, 1e-2, 1e-3, 0),
              'cgl_orth': (1e-3, 1e-2, 1e-3, 1e-3)}
  assert lambdas == pytest.approx(expected[row])
  # R_bn replaces weight decay (method.md); baselines decay.
  assert (config.optimizer.weight_decay > 0) == (row == 'baseline')
  assert config.cgl.num_groups == 5


def test_default_variant_is_cgl_and_tokens_commute():
  for name in CONFIG_VARIANTS:
    assert load(name).to_dict() == load(name, 'cgl').to_dict()
  assert load('shapes.py', 'paper,rbn').to_dict() == load('shapes.py', 'rbn,paper').to_dict()


def test_shapes_settings_as_documented():
  small, paper = load('shapes.py'), load('shapes.py', 'cgl,paper')
  assert small.model.kwargs.widths == (32, 64) and paper.model.kwargs.widths == (128, 256)
  assert (small.dataset.image_size, small.dataset.augment) == (32, 'pad_crop')
  assert (paper.dataset.image_size, paper.dataset.augment) == (64, 'random_resized_crop')
  assert (paper.batch_size, paper.optimizer.learning_rate, paper.optimizer.momentum) == (
      32, 0.01, 0.9)  # the authors' synthetic settings
  assert small.cgl.layers == paper.cgl.layers == ('conv2',)
  assert small.dataset.name == 'cgl_shapes/binary' and small.dataset.num_classes == 2
  classes45 = load('shapes.py', 'classes45,tiny')
  assert (classes45.dataset.name, classes45.dataset.num_classes) == (
      'cgl_shapes/classes45_tiny', 45)
  assert small.dissect.enabled and small.dissect.layers == ('conv1', 'conv2')
  assert small.dissect.iou_thresholds == (0.04, 0.08)


def test_shapes_paper_is_the_authors_recipe():
  """configs/shapes.py:paper = the authors' synthetic training code (docstring of shapes.py)."""
  small, paper = load('shapes.py'), load('shapes.py', 'paper')
  assert paper.model.kwargs.initializer == 'pytorch' and 'initializer' not in small.model.kwargs
  assert (paper.num_epochs, paper.optimizer.schedule, paper.optimizer.step_every_epochs,
          paper.optimizer.step_factor) == (90, 'step', 30, 0.1)
  assert (paper.dataset.eval_crop, small.dataset.eval_crop) == ('none', None)
  assert paper.dataset.pad_value == small.dataset.pad_value == (255.0, 255.0, 255.0)
  assert (paper.dissect.checkpoint, small.dissect.checkpoint) == ('best', 'latest')
  assert paper.dissect.measurement == 'netdissect_lite'
  orth = load('shapes.py', 'cgl_orth,paper')
  assert (orth.cgl.lambda_o, orth.optimizer.weight_decay) == (1e-3, 0.0)


@pytest.mark.parametrize('name, dataset, classes, model', [
    ('places365_alexnet.py', 'places365_small', 365, 'alexnet'),
    ('places365_alexnet_bn.py', 'places365_small', 365, 'alexnet_bn'),
    ('places365_vgg16.py', 'places365_small', 365, 'vgg16'),
    ('imagenet_alexnet.py', 'imagenet2012', 1000, 'alexnet'),
    ('imagenet_vgg16.py', 'imagenet2012', 1000, 'vgg16'),
])
def test_large_configs_use_the_authors_recipe(name, dataset, classes, model):
  config = load(name)
  assert (config.dataset.name, config.dataset.num_classes, config.model.name) == (
      dataset, classes, model)
  optimizer = config.optimizer
  assert (optimizer.name, optimizer.learning_rate, optimizer.momentum, optimizer.schedule,
          optimizer.step_every_epochs, optimizer.step_factor) == ('sgd', 0.01, 0.9, 'step', 30, 0.1)
  assert (config.num_epochs, config.batch_size, config.dataset.image_size) == (90, 256, 224)
  assert config.dataset.augment == 'random_resized_crop'
  assert load(name, 'baseline').optimizer.weight_decay == 1e-4
  assert config.dissect.image_size == (227 if 'alexnet' in name else 224)


def test_cifar_regularises_the_last_stage():
  config = load('cifar.py', 'cgl,cifar100')
  assert config.model.name == 'resnet18' and config.model.kwargs.stem == 'cifar'
  assert config.dataset.num_classes == 100 and config.dataset.augment == 'pad_crop'
  assert all(layer.startswith('layer4_') for layer in config.cgl.layers)


def test_configs_load_from_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert load('shapes.py', 'baseline').optimizer.weight_decay == 1e-4
  # As --config=… loads it: ml_collections' own parser of config files.
  path = os.path.relpath(os.path.join(REPO, 'configs', 'shapes.py'), tmp_path)
  parsed = config_flags.config_flags.ConfigFileFlagParser('config').parse(f'{path}:baseline')
  assert parsed.to_dict() == load('shapes.py', 'baseline').to_dict()


def test_default_config_file_is_the_package_default():
  assert load('default.py').to_dict() == default_config.get_config().to_dict()


def test_load_config_file_names_a_missing_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"config file 'configs/shapes.py' not found "
                                              r'\(working directory .*\)'):
    default_config.load_config_file('configs/shapes.py:cgl')


@pytest.mark.parametrize('variant, message', [
    ('cgl,huge', "unknown config variant 'huge' in 'cgl,huge'; allowed (regularizer: "
                 'cgl|baseline|rbn|cgl_orth; size: small|paper; labels: binary|classes45; data: full|tiny)'),
    ('cgl,rbn', "config variant 'cgl,rbn' sets regularizer twice ('cgl' and 'rbn')"),
])
def test_bad_variant_is_named(variant, message):
  with pytest.raises(ValueError) as error:
    load('shapes.py', variant)
  assert str(error.value) == message
