"""The shared defaults (`cgl_jax.default_config.get_config`) as a config file: a shapes_cnn run
with plain cross-entropy on `cgl_shapes/binary`, the schema every other config file extends.

    python -m cgl_jax.main --config=configs/default.py --workdir=/tmp/default
"""
from cgl_jax import default_config


def get_config():
  return default_config.get_config()
