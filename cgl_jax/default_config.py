"""Shared defaults of every cgl_jax config (the schema all configs extend) and config-file helpers.

Each file in `configs/` imports this module and overrides what its experiment needs:

    from cgl_jax import default_config

    def get_config(variant: str = 'cgl'):
      options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS})
      config = default_config.get_config()
      …

Keys are documented where they are set. Variants: every config file takes a comma-separated
variant string after its path (`--config=configs/shapes.py:rbn,paper`), parsed by `parse_variant`;
the regulariser rows of the paper are set by `set_regularizer`. `load_config_file` loads a config
file the way `--config` does, for scripts without absl flags.
"""
import importlib.util
import os
from collections.abc import Mapping, Sequence

import ml_collections

# The paper's regulariser rows (Table 1; Tables 2/3 use baseline vs cgl), and 'cgl_orth': cgl
# plus the soft orthogonality term of the authors' code.
REGULARIZERS = ('cgl', 'baseline', 'rbn', 'cgl_orth')
# λ_o of the authors' only synthetic run (named ..._pen0.01_act0.001_spa0_..._orth0.001: λ_bn
# 0.01, λ_g 0.001, λ_s 0, λ_o 0.001); the paper never mentions the term.
AUTHORS_LAMBDA_O = 1e-3
BASELINE_WEIGHT_DECAY = 1e-4  # the authors' baselines (docs/method.md)


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
  # Eval transform: None = the augmentation's ('center' for random_resized_crop: Resize(S·256/224)
  # + CenterCrop(S); else the whole image), 'center' | 'none' (whole image resized to S).
  config.dataset.eval_crop = ml_collections.FieldReference(None, field_type=str)
  config.dataset.pad_value = (0.0, 0.0, 0.0)  # pad_crop's border, RGB on the 0–255 scale
  config.dataset.mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  config.dataset.std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  config.dataset.shuffle_buffer = 10_000
  config.prefetch_batches = 2  # batches transferred to the devices ahead of the step

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
  config.optimizer.weight_decay = 1e-4  # 0 when config.cgl.lambda_bn > 0 (docs/method.md)
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
  # L_g / L_s implementations (cgl_jax.kernels): 'auto' (fastest here), 'jnp', 'loop', 'matmul',
  # 'cpu_ffi', 'pallas'. 'jnp' is the only one with forward-mode derivatives.
  config.cgl.kernels = 'auto'

  # Loop.
  config.log_every_steps = 50
  config.eval_every_steps = -1  # -1: once per epoch
  config.checkpoint_every_steps = -1  # -1: once per epoch
  config.keep_checkpoints = 3  # newest steps kept; the best by validation top-1 is kept too
  config.async_checkpoints = True  # write checkpoints in the background while training goes on

  # Network dissection (cgl_jax.dissect).
  config.dissect = ml_collections.ConfigDict()
  config.dissect.enabled = False  # True: the default --mode dissects after training
  config.dissect.layers = ('conv1', 'conv2')
  config.dissect.broden_dir = ml_collections.FieldReference(None, field_type=str)  # None: shapes export
  config.dissect.quantile = 0.005  # top 0.5 % activations per unit
  config.dissect.exact_quantile = True  # exact T_k (streaming radix select); False: histogram
  # How to measure (cgl_jax/dissect/measurement.py): a preset, 'netdissect_lite' (PIL bilinear,
  # IoU 0.04) | 'authors_synthetic' (the CGL authors' shapes dissection: nearest, JPEG q95 probe
  # images, all images, IoU 0.08 and 0.04) | 'authors_synthetic_pillow7' (bicubic instead).
  # The fields below set to None take the preset's value; any other value overrides it.
  config.dissect.measurement = 'netdissect_lite'
  config.dissect.upsampling = ml_collections.FieldReference(None, field_type=str)  # bilinear|nearest|bicubic
  config.dissect.image_format = ml_collections.FieldReference(None, field_type=str)  # png|jpeg (shapes export)
  config.dissect.probe_split = ml_collections.FieldReference(None, field_type=str)  # validation|all (shapes)
  config.dissect.iou_thresholds = ml_collections.FieldReference(None, field_type=tuple)  # first: detectors
  config.dissect.categories = ml_collections.FieldReference(None, field_type=tuple)  # None: all
  config.dissect.batch_size = 64
  config.dissect.image_size = ml_collections.FieldReference(None, field_type=int)  # None: dataset.image_size
  config.dissect.top_images = 10
  # 'auto': on a GPU/TPU keep the probe set on the device (decoded once for all passes) when it
  # is ≤ 2 GiB as batches; 'device': always; 'none': read it from its files in every pass.
  config.dissect.probe_cache = 'auto'
  config.dissect.checkpoint = 'latest'  # | 'best': highest validation top-1, earliest of ties
  return config


def parse_variant(variant: str | None, choices: Mapping[str, Sequence[str]]) -> dict[str, str]:
  """'rbn,paper' → {'regularizer': 'rbn', 'size': 'paper', …}: one token per option at most.

  Args:
    variant: comma-separated tokens ('' or None: all defaults).
    choices: option name → its allowed tokens; the FIRST token is the option's default.

  Raises:
    ValueError: a token no option allows, or two tokens for the same option.
  """
  chosen = {}
  owner = {token: option for option, tokens in choices.items() for token in tokens}
  for token in filter(None, (t.strip() for t in (variant or '').split(','))):
    if token not in owner:
      allowed = '; '.join(f'{option}: {"|".join(tokens)}' for option, tokens in choices.items())
      raise ValueError(f'unknown config variant {token!r} in {variant!r}; allowed ({allowed})')
    option = owner[token]
    if option in chosen:
      raise ValueError(f'config variant {variant!r} sets {option} twice '
                       f'({chosen[option]!r} and {token!r})')
    chosen[option] = token
  return {option: chosen.get(option, tokens[0]) for option, tokens in choices.items()}


def set_regularizer(config: ml_collections.ConfigDict, row: str, *, lambda_bn: float,
                    lambda_g: float, lambda_s: float) -> ml_collections.ConfigDict:
  """Sets the objective of one of the paper's rows (docs/method.md), in place; returns `config`.

  'baseline': cross-entropy + weight decay 1e-4 (no CGL term);
  'rbn':      cross-entropy + λ_bn·R_bn, weight decay 0 (R_bn replaces it);
  'cgl':      cross-entropy + λ_bn·R_bn + λ_g·L_g + λ_s·L_s, weight decay 0;
  'cgl_orth': 'cgl' + λ_o·R_orth with λ_o = `AUTHORS_LAMBDA_O` (R_orth = Σ over every conv
              kernel of ‖W Wᵀ − I‖_F, the authors' code; `cgl_jax.regularize`).
  """
  if row not in REGULARIZERS:
    raise ValueError(f'unknown regularizer row {row!r}; expected one of {REGULARIZERS}')
  cgl = row in ('cgl', 'cgl_orth')
  config.cgl.lambda_bn = 0.0 if row == 'baseline' else lambda_bn
  config.cgl.lambda_g = lambda_g if cgl else 0.0
  config.cgl.lambda_s = lambda_s if cgl else 0.0
  config.cgl.lambda_o = AUTHORS_LAMBDA_O if row == 'cgl_orth' else 0.0
  config.optimizer.weight_decay = BASELINE_WEIGHT_DECAY if row == 'baseline' else 0.0
  return config


# The authors' settings for the large data sets (docs/method.md, "Where the paper and the
# authors' code differ").
AUTHORS_LAMBDA_BN = 1e-3  # their range: 1e-3 … 5e-3
# λ_g, λ_s are not published (their sweep range: 1e-3 … 1e-1); these are our starting points.
DEFAULT_LAMBDA_G = 1e-2
DEFAULT_LAMBDA_S = 1e-3


def set_authors_recipe(config: ml_collections.ConfigDict, *, dataset: str, num_classes: int,
                       model: str, cgl_layers: Sequence[str], dissect_layers: Sequence[str],
                       dissect_image_size: int, regularizer: str) -> ml_collections.ConfigDict:
  """The authors' ImageNet-style recipe (docs/method.md), in place; returns `config`.

  SGD momentum 0.9, lr 0.01 ×0.1 every 30 epochs, 90 epochs, batch 256; random-resized-crop 224
  + flip with ImageNet mean/std (eval: resize 256, center crop 224); G = 5; the regulariser row
  via `set_regularizer`. Dissection needs a Broden directory (`config.dissect.broden_dir`), so
  it is off by default.
  """
  config.model.name = model
  config.dataset.name = dataset
  config.dataset.num_classes = num_classes
  config.dataset.image_size = 224
  config.dataset.augment = 'random_resized_crop'
  config.dataset.mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  config.dataset.std = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = 90.0
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = 'step'
  config.optimizer.step_every_epochs = 30
  config.optimizer.step_factor = 0.1
  config.cgl.layers = tuple(cgl_layers)
  config.cgl.num_groups = 5
  set_regularizer(config, regularizer, lambda_bn=AUTHORS_LAMBDA_BN, lambda_g=DEFAULT_LAMBDA_G,
                  lambda_s=DEFAULT_LAMBDA_S)
  config.log_every_steps = 100
  config.eval_every_steps = -1  # once per epoch
  config.checkpoint_every_steps = 1000
  config.dissect.enabled = False
  config.dissect.layers = tuple(dissect_layers)
  config.dissect.image_size = dissect_image_size
  return config


def load_config_file(path_and_variant: str) -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file, loaded as `--config=path[:variant]` loads it.

  Args:
    path_and_variant: the file's path (absolute, or relative to the working directory),
      optionally followed by ':' and the variant string (`'configs/shapes.py:rbn,paper'`);
      without ':' the file's default variant is used.

  Raises:
    FileNotFoundError: no such file.
  """
  path, has_variant, variant = path_and_variant.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found (working directory {os.getcwd()})')
  name = 'cgl_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([variant] if has_variant else []))
