"""cgl_jax.tree_util.lookup: nested reads and the error that names the missing key."""
import re

import pytest

from cgl_jax.tree_util import lookup


def test_lookup_reads_nested_mappings():
  tree = {'conv1': {'Conv_0': {'kernel': 3.0, 'bias': 1.0}}, 'scale': 2.0}
  assert lookup(tree, ('conv1', 'Conv_0', 'kernel'), what='params') == 3.0
  assert lookup(tree, ('scale',), what='params') == 2.0
  assert lookup(tree, (), what='params') is tree


@pytest.mark.parametrize('path, missing', [
    (('conv2', 'Conv_0', 'kernel'), 'conv2'),
    (('conv1', 'BatchNorm_0', 'scale'), 'BatchNorm_0'),
    (('conv1', 'Conv_0', 'kernel', 'deeper'), 'deeper'),  # a leaf is not a mapping
])
def test_missing_key_is_named_with_the_tree_and_the_path(path, missing):
  tree = {'conv1': {'Conv_0': {'kernel': 3.0}}}
  with pytest.raises(KeyError, match=re.escape(
      f"batch_stats: no entry {'/'.join(path)!r} (missing {missing!r})")):
    lookup(tree, path, what='batch_stats')
