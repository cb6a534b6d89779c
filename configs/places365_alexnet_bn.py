r"""AlexNet-B (batch norm after every conv) on Places365 (the paper's Table 2): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/places365_alexnet_bn.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds

Variants: cgl (default) | baseline | rbn. Soft masks use the BN form ψ = sigmoid(P1·y/γ + P2)
(the paper's; `--config.cgl.bn_mask=code` divides by the running variance as the authors' code
does). Settings as configs/places365_alexnet.py (the authors', method.md).

Paper (Table 2, unique detectors conv1..conv5 summed, Broden, IoU ≥ 0.04): weight decay 148 →
CGL 166.
"""
import os
import runpy

_default = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))


def get_config(variant: str = 'cgl'):
  options = _default['parse_variant'](variant, {'regularizer': _default['REGULARIZERS']})
  config = _default['set_authors_recipe'](
      _default['get_config'](), dataset='places365_small', num_classes=365, model='alexnet_bn',
      cgl_layers=('conv4', 'conv5'), dissect_layers=('conv1', 'conv2', 'conv3', 'conv4', 'conv5'),
      dissect_image_size=227, regularizer=options['regularizer'])
  config.cgl.bn_mask = 'paper'
  return config
