r"""AlexNet on ImageNet (ILSVRC 2012; the paper's Table 2): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/imagenet_alexnet.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds

Variants: cgl (default: L_g, L_s on conv4, conv5) | baseline | rbn. Data: tfds `imagenet2012`
(manual download; see the tfds catalog). Settings: the authors' (docs/method.md).

Paper (Table 2, unique detectors conv1..conv5 summed, Broden, IoU ≥ 0.04): weight decay 136 →
CGL 141.
"""
from cgl_jax import default_config


def get_config(variant: str = 'cgl'):
  options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS})
  return default_config.set_authors_recipe(
      default_config.get_config(), dataset='imagenet2012', num_classes=1000, model='alexnet',
      cgl_layers=('conv4', 'conv5'), dissect_layers=('conv1', 'conv2', 'conv3', 'conv4', 'conv5'),
      dissect_image_size=227, regularizer=options['regularizer'])
