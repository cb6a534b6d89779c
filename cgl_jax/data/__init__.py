"""Data sets: the synthetic shapes generator, its tfds builder and the Broden format.

Submodules are imported explicitly (``from cgl_jax.data import shapes``) so that
importing the package stays cheap; ``cgl_jax.data.shapes_tfds`` imports
tensorflow_datasets and registers the ``cgl_shapes`` builder.
"""
