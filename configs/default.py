"""Shared defaults for every cgl_jax config (the schema all configs extend).

Not meant to be run on its own; each config file imports `get_config()` from here
and overrides what its experiment needs. Keys are documented where they are set.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model: cgl_jax.models.create(config.model.name, **config.model.kwargs).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'shapes_cnn'
  config.model.kwargs = ml_collections.ConfigDict()
  config.model.dtype = 'float32'  # compute dtype ('bfloat16' on GPU/TPU); params stay float32.

  # Data (cgl_jax.input_pipeline).
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'cgl_shapes/binary'  # a tfds name
  config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.dataset.download = False  # never download unless asked: fail fast instead
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.num_classes = 2
  config.dataset.image_size = 64
  config.dataset.augment = 'random_resized_crop'  # | 'pad_crop' | 'none'
  config.dataset.mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  config.dataset.std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  config.dataset.shuffle_buffer = 10_000

  # Batches are global (over all devices and hosts).
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_epochs = 1.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.steps_per_eval = -1  # -1: the whole eval split

  # Optimisation.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # | 'adamw'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 1e-4  # forced to 0 when config.cgl.lambda_bn > 0 (method.md)
  config.optimizer.schedule = 'step'  # | 'warmup_cosine' | 'constant'
  config.optimizer.step_every_epochs = 30
  config.optimizer.step_factor = 0.1
  config.optimizer.warmup_epochs = 0.0

  # CGL objective (cgl_jax.regularize). All lambdas 0 = plain cross-entropy baseline.
  config.cgl = ml_collections.ConfigDict()
  config.cgl.layers = ('conv2',)  # sown layer names that get L_g and L_s
  config.cgl.num_groups = 5
  config.cgl.pairs = 'sampled'  # | 'exact'
  config.cgl.num_pairs = ml_collections.FieldReference(None, field_type=int)  # None: 3·f
  config.cgl.reduction = 'per_sample'  # | 'pooled'
  config.cgl.lambda_bn = 0.0
  config.cgl.lambda_g = 0.0
  config.cgl.lambda_s = 0.0
  config.cgl.lambda_o = 0.0
  config.cgl.learn_p = False  # P1, P2 fixed to (p1, p2) as in the authors' code
  config.cgl.p1 = 1.0
  config.cgl.p2 = 0.0
  config.cgl.bn_mask = 'paper'  # 'paper': y / gamma; 'code': authors' running_var form

  # Loop.
  config.log_every_steps = 50
  config.eval_every_steps = -1  # -1: once per epoch
  config.checkpoint_every_steps = -1  # -1: once per epoch
  config.keep_checkpoints = 3

  # Network dissection (cgl_jax.dissect).
  config.dissect = ml_collections.ConfigDict()
  config.dissect.enabled = False  # True: the default --mode dissects after training
  config.dissect.layers = ('conv1', 'conv2')
  config.dissect.broden_dir = ml_collections.FieldReference(None, field_type=str)  # None: shapes export
  config.dissect.quantile = 0.005  # top 0.5 % activations per unit
  config.dissect.iou_thresholds = (0.04,)
  config.dissect.batch_size = 64
  config.dissect.image_size = ml_collections.FieldReference(None, field_type=int)  # None: dataset.image_size
  config.dissect.top_images = 10
  return config
