r"""ResNet-18 (CIFAR stem) on CIFAR-10/100: weight decay vs CGL on the last stage.

    python -m cgl_jax.main --config=configs/cifar.py:cgl --workdir=DIR
    python -m cgl_jax.main --config=configs/cifar.py:baseline,cifar100 --workdir=DIR

Variants (comma-separated): regularizer cgl (default) | baseline | rbn; data cifar10 (default) |
cifar100. The paper has no CIFAR experiment: this config is the fast real-data check of the
pipeline (tfds `cifar10`/`cifar100`, pad-crop + flip, per-channel CIFAR mean/std) with the usual
ResNet-18 recipe (SGD 0.9, lr 0.1, warm-up + cosine, 200 epochs, batch 128; baseline weight decay
5e-4, the CIFAR standard, instead of the authors' ImageNet 1e-4). CGL: L_g and L_s on the four
convs of the last stage (512 filters, 4×4 maps), R_bn on every conv, G = 5, BN soft masks.
No published numbers to compare with.
"""
from cgl_jax import default_config

_MEAN_STD = {
    'cifar10': ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    'cifar100': ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}


def get_config(variant: str = 'cgl'):
  options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS,
                                                     'data': ('cifar10', 'cifar100')})
  config = default_config.get_config()
  config.model.name = 'resnet18'
  config.model.kwargs.stem = 'cifar'
  config.dataset.name = options['data']
  config.dataset.num_classes = 10 if options['data'] == 'cifar10' else 100
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 32
  config.dataset.augment = 'pad_crop'
  config.dataset.mean, config.dataset.std = _MEAN_STD[options['data']]
  config.batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 200.0
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 1.0
  config.cgl.layers = ('layer4_block0_conv1', 'layer4_block0_conv2', 'layer4_block1_conv1',
                       'layer4_block1_conv2')
  config.cgl.num_groups = 5
  config.cgl.bn_mask = 'paper'
  default_config.set_regularizer(config, options['regularizer'],
                                 lambda_bn=default_config.AUTHORS_LAMBDA_BN,
                                 lambda_g=default_config.DEFAULT_LAMBDA_G,
                                 lambda_s=default_config.DEFAULT_LAMBDA_S)
  if options['regularizer'] == 'baseline':
    config.optimizer.weight_decay = 5e-4
  config.log_every_steps = 100
  config.dissect.enabled = False
  config.dissect.layers = ('layer3_block1_conv2', 'layer4_block1_conv2')
  return config
