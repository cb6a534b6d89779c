"""multirun: R vmapped runs equal R separate runs, the objective equals the trainer's, resume is
bit-exact, the best epoch is the first at the maximum, and exports load with restore_model."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgl_jax import checkpoints, default_config, models, multirun, multirun_loop, regularize, train
from cgl_jax.data import device_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16

# Different seeds AND rows: a weight-decay baseline (λ = 0), CGL, and R_bn + orthogonality.
ROWS = {'baseline': dict(weight_decay=1e-4),
        'cgl': dict(lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3),
        'orth': dict(lambda_bn=1e-3, lambda_o=1e-3)}


def tiny_config(num_epochs=2, augment='random_resized_crop'):
  config = default_config.load_config_file(
      os.path.join(REPO, 'configs', 'shapes.py') + ':cgl,paper,tiny')
  config.model.kwargs.widths = (4, 10)
  config.cgl.num_groups = 2
  config.dataset.image_size = SIZE
  config.dataset.augment = augment
  config.batch_size = 8
  config.eval_batch_size = 32
  config.num_epochs = num_epochs
  config.optimizer.learning_rate = 0.05
  return config


@pytest.fixture(scope='module')
def data():
  # 8 images per item pair: 270 train / 90 validation images of 16 px.
  return device_data.shapes_splits('binary', image_size=SIZE, images_per_class=8,
                                   train_fraction=0.75)


@pytest.fixture(scope='module')
def specs():
  return multirun.grid(ROWS, seeds=[0, 1])[:5]  # baseline ×2, cgl ×2, orth seed 0


def _steps(trainer, state, split, count):
  terms = []
  for _ in range(count):
    orders = trainer.epoch_orders(state, len(split))
    state, step_terms = trainer.train_step(state, split, orders)
    terms.append(step_terms)
  return state, terms


def test_vmapped_runs_equal_separate_runs(data, specs):
  config = tiny_config()
  together = multirun.MultiRun(config, specs, num_train_examples=len(data['train']),
                               run_axis='vmap')
  state, _ = _steps(together, together.init_state(), data['train'], 3)
  assert together.terms == ('r_bn', 'l_g', 'l_s', 'r_orth')
  for index in (0, 3, 4):  # baseline seed 0, cgl seed 1, orth seed 0: one compile each
    alone = multirun.MultiRun(config, [specs[index]], num_train_examples=len(data['train']))
    single, _ = _steps(alone, alone.init_state(), data['train'], 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[index], b[0], rtol=0, atol=1e-5),
                 state.params, single.params)
    assert not np.allclose(state.params['conv1']['kernel'][index],
                           state.params['conv1']['kernel'][(index + 1) % len(specs)])


def test_unrolled_runs_equal_vmap(data, specs):
  config = tiny_config()
  runs = [specs[0], specs[3], specs[4]]
  states = {}
  for run_axis in multirun.RUN_AXES:
    trainer = multirun.MultiRun(config, runs, num_train_examples=len(data['train']),
                                run_axis=run_axis)
    state, _ = _steps(trainer, trainer.init_state(), data['train'], 2)
    top1 = trainer.evaluate(state.params, state.batch_stats, data['validation'],
                            eval_batch_size=32)
    states[run_axis] = (jax.device_get(state.params), np.asarray(top1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               states['vmap'][0], states['unroll'][0])
  np.testing.assert_array_equal(states['vmap'][1], states['unroll'][1])
  with pytest.raises(ValueError, match="run_axis must be one of .*'pmap'"):
    multirun.MultiRun(config, runs, num_train_examples=100, run_axis='pmap')


def test_epoch_loops_agree(data, specs):
  """'host' is the jitted step called per step (bit-exact); 'scan' compiles the epoch into one
  loop and agrees to float rounding."""
  config = tiny_config(num_epochs=1)
  runs = [specs[3]]  # CGL: every term of the objective
  epochs = {}
  for loop in multirun.EPOCH_LOOPS:
    trainer = multirun.MultiRun(config, runs, num_train_examples=len(data['train']),
                                epoch_loop=loop)
    assert trainer.epoch_loop == loop
    state, means = trainer.train_epoch(trainer.init_state(), data['train'])
    top1 = trainer.evaluate(state.params, state.batch_stats, data['validation'],
                            eval_batch_size=32)  # 90 images: a padded last batch
    epochs[loop] = jax.device_get((state.params, means, state.step, top1))
  stepped, terms = _steps(trainer, trainer.init_state(), data['train'], trainer.steps_per_epoch)
  assert epochs['host'][2] == epochs['scan'][2] == trainer.steps_per_epoch
  jax.tree.map(np.testing.assert_array_equal, epochs['host'][0], jax.device_get(stepped.params))
  np.testing.assert_allclose(epochs['host'][1]['loss'],
                             np.mean([t['loss'] for t in terms], axis=0), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               epochs['host'][:2], epochs['scan'][:2])
  np.testing.assert_array_equal(epochs['host'][3], epochs['scan'][3])
  assert np.all(epochs['host'][3] * len(data['validation']) % 1 == 0)
  auto = multirun.MultiRun(config, runs, num_train_examples=len(data['train']))
  assert auto.epoch_loop == ('host' if jax.default_backend() == 'cpu' else 'scan')
  with pytest.raises(ValueError, match="epoch_loop must be one of .*'python'"):
    multirun.MultiRun(config, runs, num_train_examples=100, epoch_loop='python')


def test_terms_and_update_equal_the_trainers(data, specs):
  """Per run: the terms equal regularize.cgl_terms on the same batch and pair key, and the
  update equals the single-run trainer's optimizer (with its weight decay) on the same loss."""
  config = tiny_config()
  trainer = multirun.MultiRun(config, specs, num_train_examples=len(data['train']),
                              run_axis='vmap')
  start = trainer.init_state()
  start_params = jax.device_get(start.params)  # the state is donated below
  orders = trainer.epoch_orders(start, len(data['train']))
  state, terms = trainer.train_step(start, data['train'], orders)
  model = models.from_config(config)
  for index in (0, 3, 4):  # one run of each row: baseline seed 0, cgl seed 1, orth seed 0
    spec = specs[index]
    single = multirun.run_config(config, spec)
    params = jax.tree.map(lambda x: jnp.asarray(x[index]), start_params)
    # Initialisation equals the trainer's for this seed.
    init_key, train_key = jax.random.split(jax.random.key(spec.seed))
    lr = train.create_learning_rate_schedule(single.optimizer, steps_per_epoch=33,
                                             num_train_steps=66)
    tx = train.create_optimizer(single.optimizer, learning_rate=lr,
                                weight_decay=train.effective_weight_decay(single))
    reference = jax.jit(functools.partial(  # jitted, as train_and_evaluate calls it
        train.create_train_state, model, tx, image_size=SIZE, cgl_config=single.cgl))(
            key=init_key)
    jax.tree.map(np.testing.assert_array_equal, params, reference.params)

    images, labels = trainer.batch(spec.seed, 0, orders[index], data['train'])
    _, pairs_key = jax.random.split(jax.random.fold_in(train_key, 0))

    def loss_fn(trainable):
      logits, updates = model.apply({'params': trainable['params']}, images, train=True,
                                    mutable=['intermediates'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      cgl = regularize.cgl_terms(single.cgl, params=trainable['params'],
                                 intermediates=models.get_intermediates(updates),
                                 conv_layers=model.conv_layers(), key=pairs_key,
                                 terms=trainer.terms, kernels=trainer.kernels)
      return ce + regularize.weighted_sum(single.cgl, cgl), dict(ce=ce, **cgl)

    (loss, expected), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {'params': params, 'cgl': {}})
    for name, value in dict(expected, loss=loss).items():
      np.testing.assert_allclose(terms[name][index], value, rtol=2e-6, err_msg=name)
    updates, _ = tx.update(grads, tx.init({'params': params, 'cgl': {}}),
                           {'params': params, 'cgl': {}})
    new = optax.apply_updates({'params': params, 'cgl': {}}, updates)['params']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[index], b, rtol=0, atol=1e-7),
                 state.params, new)


def test_batches_depend_on_seed_and_step_only(data):
  trainer = multirun.MultiRun(tiny_config(), [multirun.RunSpec('a', 0)],
                              num_train_examples=len(data['train']))
  order = device_data.epoch_order(5, 0, len(data['train']))
  batch = jax.jit(functools.partial(trainer.batch, split=data['train']))
  first = batch(5, 3, order)
  np.testing.assert_array_equal(first[0], trainer.batch(5, 3, order, data['train'])[0])
  assert not np.array_equal(first[0], batch(5, 4, order)[0])
  assert not np.array_equal(first[0], batch(6, 3, order)[0])


def _leaves_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_resume_is_bit_exact_and_exports_load(tmp_path, data, specs):
  config = tiny_config(num_epochs=2)
  # vmap compiles R runs once (unroll compiles R copies; test_unrolled_runs_equal_vmap covers it).
  run_all = functools.partial(multirun_loop.train_runs, data=data, run_axis='vmap')
  whole = run_all(config, specs, str(tmp_path / 'whole'))
  first = run_all(config, specs, str(tmp_path / 'split'), stop_after_epoch=1)
  assert int(first.step) == whole.step // 2
  assert not os.path.exists(tmp_path / 'split' / multirun_loop.RUNS_SUBDIR)  # exported at the end
  resumed = run_all(config, specs, str(tmp_path / 'split'))
  _leaves_equal(whole, resumed)

  summary = json.loads((tmp_path / 'whole' / multirun_loop.SUMMARY_FILE).read_text())
  assert list(summary['runs']) == [spec.name for spec in specs]
  steps_per_epoch = int(whole.step) // 2
  for index, spec in enumerate(specs):
    run = summary['runs'][spec.name]
    top1 = run['history']['val_top1']
    assert run['best_epoch'] == 1 + int(np.argmax(top1))  # first epoch at the maximum
    directory = multirun_loop.run_dir(str(tmp_path / 'whole'), spec)
    single = multirun.run_config(config, spec)
    _, variables, step = checkpoints.restore_model(single, directory)
    assert step == int(whole.step)
    _leaves_equal(variables['params'], jax.tree.map(lambda x: x[index], whole.params))
    best_step = run['best_epoch'] * steps_per_epoch
    _, best, _ = checkpoints.restore_model(single, directory, step=best_step)
    _leaves_equal(best['params'], jax.tree.map(lambda x: x[index], whole.best['params']))
    with open(os.path.join(directory, 'config.json')) as f:
      assert json.load(f)['seed'] == spec.seed

  with pytest.raises(ValueError, match='holds other runs'):
    multirun_loop.train_runs(config, specs[:2], str(tmp_path / 'whole'), data=data)
  longer = tiny_config(num_epochs=3)
  with pytest.raises(ValueError, match='another config \\(num_epochs: 2.0 → 3.0\\)'):
    multirun_loop.train_runs(longer, specs, str(tmp_path / 'whole'), data=data)


def test_best_is_the_first_epoch_at_the_maximum(data):
  config = tiny_config(num_epochs=4)
  spec = [multirun.RunSpec('a', 0), multirun.RunSpec('b', 1)]
  trainer = multirun.MultiRun(config, spec, num_train_examples=len(data['train']))
  state = trainer.init_state()
  marks = {}
  sequence = [(0.5, 0.9), (0.7, 0.8), (0.7, 0.9), (0.6, 0.95)]
  for epoch, top1 in enumerate(sequence, start=1):
    # Mark each epoch's params so the kept ones can be identified.
    params = jax.tree.map(lambda x, e=epoch: jnp.full_like(x, e), state.params)
    state = state.replace(step=jnp.int32(epoch * trainer.steps_per_epoch), params=params)
    means = {name: jnp.zeros(2) for name in state.history if name != 'val_top1'}
    state = trainer.end_epoch(state, jnp.asarray(top1, jnp.float32), means)
    marks[epoch] = params
  np.testing.assert_array_equal(state.best_epoch, [2, 4])
  np.testing.assert_allclose(state.best_top1, [0.7, 0.95])
  np.testing.assert_allclose(state.history['val_top1'], np.asarray(sequence).T)
  assert float(state.best['params']['head']['kernel'][0].max()) == 2
  assert float(state.best['params']['head']['kernel'][1].min()) == 4


def test_bad_configs_and_specs_are_named():
  config = tiny_config()
  spec = [multirun.RunSpec('a', 0)]
  with pytest.raises(ValueError, match='unique'):
    multirun.MultiRun(config, spec * 2, num_train_examples=100)
  adamw = tiny_config()
  adamw.optimizer.name = 'adamw'
  with pytest.raises(ValueError, match="optimizer.name='sgd' only.*'adamw'"):
    multirun.MultiRun(adamw, spec, num_train_examples=100)
  half = tiny_config(num_epochs=1.5)
  with pytest.raises(ValueError, match='num_epochs must be a whole number'):
    multirun.MultiRun(half, spec, num_train_examples=100)
  centre = tiny_config()
  centre.dataset.eval_crop = 'center'
  with pytest.raises(ValueError, match="multirun evaluates on the whole image: set "
                                       "config.dataset.eval_crop='none'"):
    multirun.MultiRun(centre, spec, num_train_examples=100)
  with pytest.raises(ValueError, match='lambda_g must be a finite number >= 0'):
    multirun.RunSpec('a', 0, lambda_g=-1.0)
  with pytest.raises(ValueError, match="unknown hyperparameters \\['lambda_x'\\]"):
    multirun.grid({'row': {'lambda_x': 1.0}}, seeds=[0])


def test_run_spec_from_config_uses_the_effective_weight_decay():
  config = tiny_config()  # cgl: λ_bn > 0, so no weight decay
  config.seed = 7
  spec = multirun.RunSpec.from_config(config, 'cgl')
  assert (spec.seed, spec.lambda_bn, spec.weight_decay) == (7, config.cgl.lambda_bn, 0.0)
  config.cgl.lambda_bn = 0.0
  config.optimizer.weight_decay = 1e-4
  assert multirun.RunSpec.from_config(config, 'wd').weight_decay == 1e-4
  assert multirun.grid(ROWS, seeds=[3])[1] == multirun.RunSpec('cgl_seed3', 3, **ROWS['cgl'])
