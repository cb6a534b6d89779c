"""The README's Python examples run as written, in order, in one namespace."""
import os
import re

import numpy as np

README = os.path.join(os.path.dirname(__file__), os.pardir, 'README.md')


def python_blocks() -> list[str]:
  with open(README, encoding='utf-8') as f:
    return re.findall(r'```python\n(.*?)```', f.read(), flags=re.DOTALL)


def test_the_loss_examples_run_and_every_kernel_choice_agrees_with_the_plain_code():
  blocks = python_blocks()
  assert len(blocks) >= 2, 'the README lost its loss examples'
  namespace = {}
  for block in blocks:
    exec(compile(block, README, 'exec'), namespace)  # pylint: disable=exec-used
  losses, jax = namespace['losses'], namespace['jax']
  plain_l_g = losses.group_coherence(namespace['psi'], 5, pairs='sampled',
                                     key=jax.random.key(2)).sum()
  np.testing.assert_allclose(namespace['l_g'], plain_l_g, rtol=1e-5)
  np.testing.assert_allclose(namespace['l_s'], losses.spatial_concentration(namespace['psi']),
                             rtol=1e-5)
