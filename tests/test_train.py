"""The trainer end to end on a tiny ShapesCNN (CPU, ~1–2 minutes).

Data: the locally generated `cgl_shapes/binary_tiny` (360 train / 90 validation images, built once
per module into a temp data_dir) through the real input pipeline, and mocked cifar10
(`tfds.testing.mock_data`) for the end-to-end test. tfds' mock also redirects the epath file
operations orbax uses, which breaks orbax's background work, so under the mock the checkpoints
are written synchronously (`config.async_checkpoints=False`) and the test waits for the manager's
start-up clean-up (`_settled_manager`); everything else uses the production (asynchronous) path.

One uninterrupted 6-step run (module fixture) is the reference that the resumed, the killed and
restarted, and (for 2 steps) the 8-device runs must reproduce.
"""
import math
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cgl_jax import checkpoints, default_config, input_pipeline, models, train
from cgl_jax.config_validation import ConfigError, validate_config

NUM_MOCK = 48  # examples per split of the mocked cifar10

# Runs in a fresh interpreter (conftest.run_python, or each process of
# multiprocess_util.run_processes): runs PRELUDE, trains tiny_config(**OVERRIDES) in WORKDIR and
# saves the final params to OUT ('{{process}}' in it: the jax process index).
_SUBPROCESS_TRAIN = '''
import sys
import jax
import numpy as np
sys.path.insert(0, 'tests')
{prelude}
from test_train import flat_params, tiny_config
from cgl_jax import train
state = train.train_and_evaluate(tiny_config(**{overrides!r}), {workdir!r})
np.savez({out!r}.format(process=jax.process_index()), **flat_params(state.params))
'''


def tiny_config(**overrides):
  """ShapesCNN 4/6 on cgl_shapes/binary_tiny at 32×32, batch 8, full CGL objective, 3 steps.

  `overrides`: dotted config keys → values, e.g. {'cgl.num_groups': 3}.
  """
  config = default_config.get_config()
  config.model.name = 'shapes_cnn'
  config.model.kwargs.widths = (4, 6)
  config.dataset.update(dict(name='cgl_shapes/binary_tiny', num_classes=2, image_size=32,
                             augment='random_resized_crop', shuffle_buffer=64))
  config.batch_size = 8
  config.eval_batch_size = 8
  config.steps_per_eval = 2
  config.num_train_steps = 3
  config.optimizer.update(dict(schedule='constant', learning_rate=0.05))
  config.cgl.update(dict(layers=('conv1', 'conv2'), num_groups=2, pairs='sampled',
                         lambda_bn=1e-3, lambda_g=0.1, lambda_s=0.01))
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def mock_cifar_config(**overrides):
  """tiny_config on mocked cifar10 (10 classes: top-5 is logged too)."""
  config = tiny_config(**overrides)
  config.dataset.update(dict(name='cifar10', num_classes=10, augment='pad_crop',
                             eval_split='test',
                             download=True))  # mock_data reports every dataset as unprepared
  config.async_checkpoints = False
  return config


def flat_params(params):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A temp tfds data_dir holding the built cgl_shapes/binary_tiny."""
  directory = str(tmp_path_factory.mktemp('tfds'))
  assert input_pipeline.num_examples(
      tiny_config(**{'dataset.data_dir': directory}).dataset, 'train') == 360
  return directory


def _subprocess_train(run_python, *, workdir, out, prelude='', num_devices=1, **overrides):
  run_python(_SUBPROCESS_TRAIN.format(prelude=prelude, overrides=overrides, workdir=str(workdir),
                                      out=str(out)), num_devices=num_devices)
  return dict(np.load(out))


def _assert_params_equal(actual, expected, **tolerance):
  assert sorted(actual) == sorted(expected)
  for name in expected:
    if tolerance:
      np.testing.assert_allclose(actual[name], expected[name], err_msg=name, **tolerance)
    else:
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _scalars(workdir):
  """{tag: {step: value}} from the TensorBoard event files in `workdir`."""
  scalars = {}
  for name in os.listdir(workdir):
    if not name.startswith('events.out.tfevents'):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        if value.HasField('tensor'):
          number = tf.make_ndarray(value.tensor)
          if number.ndim == 0 and number.dtype.kind == 'f':
            scalars.setdefault(value.tag, {})[event.step] = float(number)
  return scalars


def _shapes(data_dir, **overrides):
  return tiny_config(**{'dataset.data_dir': data_dir}, **overrides)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dir):
  """6 uninterrupted steps, checkpoints every 2 steps: final params."""
  workdir = tmp_path_factory.mktemp('straight')
  state = train.train_and_evaluate(
      _shapes(data_dir, num_train_steps=6, checkpoint_every_steps=2), str(workdir))
  assert checkpoints.available_steps(workdir) == [2, 4, 6]
  return flat_params(state.params)


def _settled_manager(create_manager):
  """`checkpoints.create_manager` that returns once orbax's start-up clean-up has finished.

  The manager lists its directory for stale temporary checkpoints in a background thread. While
  tfds' mock builds a dataset it re-roots every epath call of the process (`MockFs`), so a listing
  that lands in that window fails on a path that does not exist (a flaky FileNotFoundError at the
  first save). Production code has no such window.
  """
  def create(*args, **kwargs):
    manager = create_manager(*args, **kwargs)
    manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access (orbax 0.12)
    return manager
  return create


def test_end_to_end_on_mock_cifar10_logs_every_term_and_checkpoints(tmp_path, monkeypatch):
  config = mock_cifar_config(**{'cgl.learn_p': True})
  monkeypatch.setattr(checkpoints, 'create_manager', _settled_manager(checkpoints.create_manager))
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 3
  scalars = _scalars(tmp_path)
  for tag in ('train/loss', 'train/ce', 'train/r_bn', 'train/l_g', 'train/l_s', 'train/top1',
              'train/top5', 'train/learning_rate', 'train/p1', 'train/p2'):
    assert sorted(scalars[tag]) == [1, 2, 3], tag
    assert all(math.isfinite(v) for v in scalars[tag].values()), (tag, scalars[tag])
  assert 'train/r_orth' not in scalars  # λ_o = 0: not computed, not logged
  # The total is CE + Σ λ·term, per step (each logged value is that step's batch value).
  for step in (1, 2, 3):
    expected = (scalars['train/ce'][step] + 1e-3 * scalars['train/r_bn'][step]
                + 0.1 * scalars['train/l_g'][step] + 0.01 * scalars['train/l_s'][step])
    np.testing.assert_allclose(scalars['train/loss'][step], expected, rtol=1e-5)
  assert scalars['train/learning_rate'][3] == pytest.approx(0.05)
  # Learned P1, P2 live in the train state (not in the model params), move, and are logged.
  assert scalars['train/p1'][3] == pytest.approx(float(state.cgl['p1']))
  assert float(state.cgl['p1']) != 1.0 and float(state.cgl['p2']) != 0.0
  assert sorted(scalars['eval/top1']) == [3] and 0 <= scalars['eval/top1'][3] <= 1
  assert checkpoints.available_steps(tmp_path) == [3]
  # The trainer-free restore gives back exactly the trained model.
  model, variables, step = checkpoints.restore_model(config, tmp_path)
  assert step == 3 and sorted(variables) == ['params']
  _assert_params_equal(flat_params(variables['params']), flat_params(state.params))
  assert model.apply(variables, np.zeros((2, 32, 32, 3), np.float32), train=False).shape == (2, 10)


def test_checkpoint_manager_keeps_latest_and_best_by_top1(tmp_path):
  def save(top1_by_step):
    with checkpoints.create_manager(tmp_path, keep=2) as manager:
      for step, top1 in top1_by_step.items():
        manager.save(step, metrics=None if top1 is None else {checkpoints.BEST_METRIC: top1},
                     args=ocp.args.Composite(**{checkpoints.MODEL_ITEM: ocp.args.StandardSave(
                         {'params': {'w': np.full(2, step, np.float32)}, 'batch_stats': {}})}))
  save({1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: 0.4, 6: None})
  assert checkpoints.available_steps(tmp_path) == [2, 5, 6]  # best (0.9) + the newest two
  assert checkpoints.best_step(tmp_path) == 2
  save({7: 0.1, 8: None})  # a restarted run still knows which kept step is the best
  assert checkpoints.available_steps(tmp_path) == [2, 7, 8]
  assert checkpoints.best_step(tmp_path) == 2


def test_resume_in_a_new_process_reproduces_the_straight_run(straight_run, data_dir, tmp_path,
                                                             python_subprocess):
  train.train_and_evaluate(_shapes(data_dir, num_train_steps=3), str(tmp_path))
  assert checkpoints.available_steps(tmp_path) == [3]
  resumed = _subprocess_train(python_subprocess, workdir=tmp_path, out=tmp_path / 'p.npz',
                              num_train_steps=6, **{'dataset.data_dir': data_dir})
  assert checkpoints.available_steps(tmp_path) == [3, 6]
  _assert_params_equal(resumed, straight_run)


# SIGKILLs the process while orbax finalises step 4: everything is written into
# `4.orbax-checkpoint-tmp…`, but the rename that commits it never happens.
_KILL_DURING_COMMIT = '''
import os, signal
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def _finalize_or_die(self):
  if self.get_final().name == '4':
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = _finalize_or_die
'''


def test_killed_mid_checkpoint_restarts_from_last_finalised_step(straight_run, data_dir,
                                                                 tmp_path, python_subprocess):
  with pytest.raises(AssertionError, match=r'rc=-9'):
    _subprocess_train(python_subprocess, workdir=tmp_path, out=tmp_path / 'p.npz',
                      prelude=_KILL_DURING_COMMIT, num_train_steps=6, checkpoint_every_steps=2,
                      **{'dataset.data_dir': data_dir})
  entries = os.listdir(tmp_path / 'checkpoints')
  assert any(name.startswith('4.orbax-checkpoint-tmp') for name in entries), entries
  assert checkpoints.available_steps(tmp_path) == [2]  # the half-committed step is invisible
  state = train.train_and_evaluate(
      _shapes(data_dir, num_train_steps=6, checkpoint_every_steps=2), str(tmp_path))
  _assert_params_equal(flat_params(state.params), straight_run)
  assert checkpoints.available_steps(tmp_path) == [2, 4, 6]
  assert not any('tmp' in name for name in os.listdir(tmp_path / 'checkpoints'))


def test_eight_devices_match_one_device(data_dir, tmp_path, python_subprocess):
  # A tiny AlexNet-B: batch-norm statistics, dropout and the BN soft masks must all be those of
  # the global batch, whatever the number of devices.
  overrides = {'dataset.data_dir': data_dir, 'num_train_steps': 2, 'eval_every_steps': 2,
               'model.name': 'alexnet_bn', 'dataset.image_size': 64,
               'model.kwargs': {'width_multiplier': 1 / 16, 'hidden_features': 16},
               'cgl.layers': ('conv4', 'conv5')}
  one = train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / 'one'))
  eight = _subprocess_train(python_subprocess, workdir=tmp_path / 'eight',
                            out=tmp_path / 'p.npz', num_devices=8, **overrides)
  _assert_params_equal(eight, flat_params(one.params), rtol=1e-5, atol=1e-6)
  one_scalars, eight_scalars = _scalars(tmp_path / 'one'), _scalars(tmp_path / 'eight')
  for tag in ('train/loss', 'train/ce', 'train/l_g', 'train/l_s', 'train/r_bn', 'eval/ce',
              'eval/top1'):
    for step, value in one_scalars[tag].items():
      np.testing.assert_allclose(eight_scalars[tag][step], value, rtol=1e-5, err_msg=tag)


@pytest.mark.parametrize('overrides, message', [
    ({'cgl.layers': ('conv2', 'conv3')},
     "config.cgl.layers: unknown layer 'conv3' for model 'shapes_cnn'; available: conv1, conv2"),
    ({'cgl.num_groups': 5},
     "config.cgl.num_groups=5 exceeds the 4 filters of layer 'conv1' of model 'shapes_cnn': "
     'G must be <= C'),
    ({'cgl.lambda_g': -0.1}, 'config.cgl.lambda_g must be >= 0, got -0.1'),
    ({'cgl.pairs': 'all'}, "config.cgl.pairs must be one of ('sampled', 'exact'), got 'all'"),
    ({'cgl.kernels': 'fast'}, "config.cgl.kernels must be one of ('auto', 'jnp', 'loop', "
                              "'matmul', 'cpu_ffi', 'pallas'), got 'fast'"),
])
def test_bad_config_fails_before_compiling(overrides, message, tmp_path, monkeypatch):
  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before validating the config')
  monkeypatch.setattr(jax, 'jit', no_compiling)
  with pytest.raises(ConfigError, match=re.escape(message)):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_batch_must_divide_over_devices():
  config = tiny_config(batch_size=12)
  layers = models.from_config(config).conv_layers()
  validate_config(config, conv_layers=layers, device_count=4)
  with pytest.raises(ConfigError, match=re.escape(
      'config.batch_size=12 is not divisible by the 8 devices (jax.device_count()); '
      'use a positive multiple of 8')):
    validate_config(config, conv_layers=layers, device_count=8)


def test_non_finite_loss_stops_naming_step_and_term(data_dir, tmp_path):
  config = _shapes(data_dir, num_train_steps=6, checkpoint_every_steps=1, eval_every_steps=100,
                   **{'optimizer.learning_rate': 1e12})
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  match = re.match(r"non-finite loss at train step (\d+): term '(\w+)' is (nan|inf|-inf) ",
                   str(error.value))
  assert match, str(error.value)
  bad_step = int(match.group(1))
  assert 1 < bad_step <= 6
  # Every step before the bad one was saved (the newest 3 are kept); the bad state never was.
  assert checkpoints.available_steps(tmp_path) == list(range(1, bad_step))[-3:]


def test_command_line_trains_a_config_file_variant(data_dir, tmp_path, python_subprocess):
  workdir = tmp_path / 'run'
  flags = ['--config=configs/shapes.py:rbn,tiny', f'--workdir={workdir}', '--mode=train',
           f'--config.dataset.data_dir={data_dir}', '--config.num_train_steps=2',
           '--config.model.kwargs.widths=(8, 10)', '--config.batch_size=8']
  python_subprocess(f'''
import sys
from absl import app
from cgl_jax import main
sys.argv = ['cgl_jax.main', *{flags!r}]
app.run(main.main)
''')
  assert checkpoints.available_steps(workdir) == [2]
  scalars = _scalars(workdir)
  assert list(scalars['train/r_bn']) == [2] and 'train/l_g' not in scalars  # the rbn row
  assert not os.path.exists(workdir / 'dissect')  # --mode=train does not dissect


def test_sgd_weight_decay_is_coupled_l2_on_model_params_only():
  baseline = tiny_config(**{'optimizer.momentum': 0.9, 'optimizer.weight_decay': 0.1,
                            'cgl.lambda_bn': 0.0})
  assert train.effective_weight_decay(baseline) == 0.1
  tx = train.create_optimizer(baseline.optimizer, learning_rate=optax.constant_schedule(0.5),
                              weight_decay=0.1)
  trainable = {'params': {'w': np.array([1.0, -2.0], np.float32)},
               'cgl': {'p1': np.float32(1.0)}}
  grads = {'params': {'w': np.array([0.5, 0.5], np.float32)}, 'cgl': {'p1': np.float32(0.5)}}
  state = tx.init(trainable)
  updates, state = tx.update(grads, state, trainable)
  # PyTorch SGD: buf = g + wd·w; w ← w − lr·buf (first step); P1/P2 are never decayed.
  np.testing.assert_allclose(updates['params']['w'], -0.5 * (0.5 + 0.1 * np.array([1.0, -2.0])))
  np.testing.assert_allclose(updates['cgl']['p1'], -0.5 * 0.5)
  updates, _ = tx.update(grads, state, trainable)  # momentum: buf = 0.9·buf + g + wd·w
  np.testing.assert_allclose(updates['params']['w'],
                             -0.5 * 1.9 * (0.5 + 0.1 * np.array([1.0, -2.0])), rtol=1e-6)
  # R_bn replaces weight decay (method.md).
  assert train.effective_weight_decay(tiny_config(**{'optimizer.weight_decay': 0.1})) == 0.0


@pytest.mark.parametrize('schedule, warmup_epochs, expected', [
    ('step', 0.0, {0: 0.1, 29 * 10: 0.1, 30 * 10: 0.01, 60 * 10: 0.001}),
    ('constant', 0.0, {0: 0.1, 500: 0.1}),
    ('warmup_cosine', 1.0, {0: 0.0, 5: 0.05, 10: 0.1, 10 + 300: 0.05, 610: 0.0}),
    ('step', 1.0, {0: 0.0, 5: 0.05, 10: 0.1, 10 + 300: 0.01}),
])
def test_learning_rate_schedules(schedule, warmup_epochs, expected):
  config = tiny_config(**{'optimizer.schedule': schedule, 'optimizer.learning_rate': 0.1,
                          'optimizer.warmup_epochs': warmup_epochs})
  lr = train.create_learning_rate_schedule(config.optimizer, steps_per_epoch=10,
                                           num_train_steps=600 + 10 * int(warmup_epochs))
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, abs=1e-7), step


def test_top5_accuracy_counts_labels_among_the_five_largest_logits():
  logits = np.array([[0., 1., 2., 3., 4., 5., 6.],    # label 2: 5th largest → hit
                     [0., 1., 2., 3., 4., 5., 6.],    # label 1: 6th largest → miss
                     [6., 5., 4., 3., 2., 1., 0.],    # label 0: largest → hit
                     [6., 5., 4., 3., 2., 1., 0.]],   # masked out
                    np.float32)
  labels = np.array([2, 1, 0, 6], np.int32)
  mask = np.array([True, True, True, False])
  for fn in (train.Top5Accuracy.from_model_output,
             jax.jit(train.Top5Accuracy.from_model_output)):
    metric = fn(logits=logits, labels=labels, mask=mask)
    assert float(metric.compute()) == pytest.approx(2 / 3)
  collection = train.create_metrics_collection(('ce',), num_classes=7)
  update = collection.single_from_model_output(logits=logits, labels=labels, mask=mask,
                                               ce=np.zeros(4, np.float32))
  assert update.compute()['top5'] == pytest.approx(2 / 3)
  assert 'top5' not in train.create_metrics_collection(('ce',), num_classes=4).__annotations__


@flax.struct.dataclass
class State:
  """The fields of a train state that `checkpoints.save`/`restore` need, and no trainer."""
  step: jax.Array
  params: dict
  batch_stats: dict
  cgl: dict
  opt_state: tuple
  note: str = flax.struct.field(pytree_node=False, default='kept')


def test_checkpoints_save_and_restore_any_state_with_the_train_fields(tmp_path):
  """checkpoints.save/restore only need the fields (and `replace`) of a train state."""
  saved = State(step=jnp.asarray(5, jnp.int32), params={'w': jnp.arange(3.0)},
                batch_stats={'mean': jnp.ones(2)}, cgl={'p1': jnp.asarray(2.0)},
                opt_state=(jnp.full(3, 0.5),))
  template = jax.tree.map(jnp.zeros_like, saved)
  with checkpoints.create_manager(tmp_path, asynchronous=False) as manager:
    checkpoints.save(manager, saved, eval_metrics={'top1': 0.75})
  assert checkpoints.best_step(tmp_path) == 5
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    restored = checkpoints.restore(manager, template, 5)
  assert type(restored) is State and restored.note == 'kept'
  for got, expected in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(got, expected)


def test_best_checkpoint_is_the_first_step_at_the_maximum(tmp_path):
  """Ties at the best top-1 keep and return the EARLIER step (the authors' `if acc > best`),
  also when later steps push it out of the newest ones."""
  state = State(step=jnp.asarray(0, jnp.int32), params={'w': jnp.zeros(2)}, batch_stats={},
                cgl={}, opt_state=())
  with checkpoints.create_manager(tmp_path, keep=2, asynchronous=False) as manager:
    for step, top1 in ((1, 0.5), (2, 0.9), (3, 0.9), (4, 0.3), (5, 0.2)):
      checkpoints.save(manager, state.replace(step=jnp.asarray(step, jnp.int32)),
                       eval_metrics={'top1': top1})
  assert checkpoints.available_steps(tmp_path) == [2, 4, 5]
  assert checkpoints.best_step(tmp_path) == 2
