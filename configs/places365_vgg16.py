r"""VGG16 on Places365 (the paper's Table 2): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/places365_vgg16.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds

Variants: cgl (default: L_g, L_s on conv5_2, conv5_3) | baseline | rbn. Settings: the authors'
(method.md).

Paper (Table 2, unique detectors in conv3_3, conv4_3, conv5_1, conv5_2, conv5_3 summed, Broden,
IoU ≥ 0.04): weight decay 315 → CGL 332.
"""
import os
import runpy

_default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))


def get_config(variant: str = 'cgl'):
  options = _default['parse_variant'](variant, {'regularizer': _default['REGULARIZERS']})
  return _default['set_authors_recipe'](
      _default['get_config'](), dataset='places365_small', num_classes=365, model='vgg16',
      cgl_layers=('conv5_2', 'conv5_3'),
      dissect_layers=('conv3_3', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3'),
      dissect_image_size=224, regularizer=options['regularizer'])
