"""cgl_jax: Concept Group Learning (IJCAI 2021) in JAX/Flax."""
import setuptools

# Ranges are the ones tested together on our machines (jax 0.10.2, flax 0.12.8,
# optax 0.2.8, orbax-checkpoint 0.12.8, tensorflow-cpu 2.21, tfds 4.9.10, clu 0.0.12).
INSTALL_REQUIRES = [
    'jax>=0.10,<0.11',
    'flax>=0.12,<0.13',
    'optax>=0.2.6,<0.3',
    'orbax-checkpoint>=0.12,<0.13',
    'ml_collections>=1.0,<2',
    'absl-py>=2.0',
    'numpy>=1.26,<3',
    'tensorflow-cpu>=2.20,<2.22',
    'tensorflow-datasets>=4.9.9,<4.10',
    'importlib_resources>=6',  # tfds needs it on Python 3.11 but does not declare it
    'clu>=0.0.12',
    'tensorboard>=2.20,<2.22',  # clu's metric writers
    'matplotlib>=3.8',
    'pillow>=10',
    'etils[epath]>=1.5',  # workdirs and data dirs on any file system (gs://…); tfds/orbax use it
]

setuptools.setup(
    name='cgl_jax',
    version='0.1.0',
    description='Concept Group Learning: interpretable CNN filters in JAX/Flax',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['cgl_jax', 'cgl_jax.*']),
    # The C++ sources of the CPU kernels, compiled on first use (cgl_jax/kernels/cpu.py).
    package_data={'cgl_jax.kernels': ['csrc/*.cc', 'csrc/*.h']},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5'],
        # Cloud TPU VMs (docs/tpu_pods.md): jax with libtpu, the same jax release as above.
        'tpu': ['jax[tpu]>=0.10,<0.11'],
    },
)
