r"""VGG16 on Places365 (the paper's Table 2): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/places365_vgg16.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds

Variants: cgl (default: L_g, L_s on conv5_2, conv5_3) | baseline | rbn. Settings: the authors'
(docs/method.md).

Paper (Table 2, unique detectors in conv3_3, conv4_3, conv5_1, conv5_2, conv5_3 summed, Broden,
IoU ≥ 0.04): weight decay 315 → CGL 332.
"""
from cgl_jax import default_config


def get_config(variant: str = 'cgl'):
  options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS})
  return default_config.set_authors_recipe(
      default_config.get_config(), dataset='places365_small', num_classes=365, model='vgg16',
      cgl_layers=('conv5_2', 'conv5_3'),
      dissect_layers=('conv3_3', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3'),
      dissect_image_size=224, regularizer=options['regularizer'])
