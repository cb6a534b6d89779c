r"""VGG16 on ImageNet (ILSVRC 2012; the paper's Table 2): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/imagenet_vgg16.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds

Variants: cgl (default: L_g, L_s on conv5_2, conv5_3) | baseline | rbn. Data: tfds `imagenet2012`
(manual download). Settings: the authors' (docs/method.md).

Paper (Table 2, unique detectors in conv3_3, conv4_3, conv5_1, conv5_2, conv5_3 summed, Broden,
IoU ≥ 0.04): weight decay 259 → CGL 266.
"""
from cgl_jax import default_config


def get_config(variant: str = 'cgl'):
  options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS})
  return default_config.set_authors_recipe(
      default_config.get_config(), dataset='imagenet2012', num_classes=1000, model='vgg16',
      cgl_layers=('conv5_2', 'conv5_3'),
      dissect_layers=('conv3_3', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3'),
      dissect_image_size=224, regularizer=options['regularizer'])
