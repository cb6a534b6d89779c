r"""AlexNet on Places365 (the paper's Table 2 headline row): weight decay vs CGL.

    python -m cgl_jax.main --config=configs/places365_alexnet.py:baseline --workdir=DIR \
        --config.dataset.data_dir=/data/tfds
    python -m cgl_jax.main --config=configs/places365_alexnet.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds --mode=train_and_dissect \
        --config.dissect.broden_dir=/data/broden1_227

Variants: cgl (default: R_bn + L_g + L_s on conv4, conv5) | baseline (weight decay 1e-4) | rbn.
Data: tfds `places365_small` (prepare it first; nothing is downloaded unless
--config.dataset.download=True). Settings: the authors' (docs/method.md): SGD 0.9, lr 0.01
×0.1 every 30 epochs, 90 epochs, batch 256, G = 5, λ_bn = 1e-3; λ_g, λ_s are not published.

Paper (Table 2, unique detectors, Broden, IoU ≥ 0.04), weight decay → CGL:
conv1..conv5 6, 12, 22, 36, 54 (sum 130) → 8, 17, 35, 50, 75 (185); RUD 0.176 → 0.244;
top-1 51.14 % → 50.46 %. Dissection probes at 227×227 as in the paper.
"""
from cgl_jax import default_config


def get_config(variant: str = 'cgl'):
  options = default_config.parse_variant(variant, {'regularizer': default_config.REGULARIZERS})
  return default_config.set_authors_recipe(
      default_config.get_config(), dataset='places365_small', num_classes=365, model='alexnet',
      cgl_layers=('conv4', 'conv5'), dissect_layers=('conv1', 'conv2', 'conv3', 'conv4', 'conv5'),
      dissect_image_size=227, regularizer=options['regularizer'])
