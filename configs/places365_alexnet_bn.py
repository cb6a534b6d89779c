r"""AlexNet-B (batch norm after every conv) on Places365 (the paper's Table 2): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/places365_alexnet_bn.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds

Variants: cgl (default) | baseline | rbn. Soft masks use the BN form ψ = sigmoid(P1·y/γ + P2)
(the paper's; `--config.cgl.bn_mask=code` divides by the running variance as the authors' code
does). Settings as configs/places365_alexnet.py (the authors', docs/method.md).

Paper (Table 2, unique detectors conv1..conv5 summed, Broden, IoU ≥ 0.04): weight decay 148 →
CGL 166.
"""
from cgl_jax import default_config


def get_config(variant: str = 'cgl'):
  options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS})
  config = default_config.set_authors_recipe(
      default_config.get_config(), dataset='places365_small', num_classes=365, model='alexnet_bn',
      cgl_layers=('conv4', 'conv5'), dissect_layers=('conv1', 'conv2', 'conv3', 'conv4', 'conv5'),
      dissect_image_size=227, regularizer=options['regularizer'])
  config.cgl.bn_mask = 'paper'
  return config
