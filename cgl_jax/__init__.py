"""cgl_jax: Concept Group Learning (Varshneya et al., IJCAI 2021) in JAX/Flax.

Importing the package imports nothing heavy: ``cgl_jax.losses`` (jax only) is the
piece other projects reuse; models, training and dissection live in submodules.
"""

__version__ = "0.1.0"
