"""cgl_jax.tree_util.lookup: nested entries by key path, with errors that name what is missing."""
import pytest

from cgl_jax import tree_util

TREE = {'conv1': {'kernel': 1, 'bias': 2}, 'bn1': {'scale': 3}}


def test_lookup_follows_the_path():
  assert tree_util.lookup(TREE, ('conv1', 'bias'), what='params') == 2
  assert tree_util.lookup(TREE, ['bn1'], what='params') == {'scale': 3}
  assert tree_util.lookup(TREE, (), what='params') is TREE


@pytest.mark.parametrize('path, message', [
    (('conv2', 'kernel'), "params: no entry 'conv2/kernel' (missing 'conv2')"),
    (('conv1', 'scale'), "params: no entry 'conv1/scale' (missing 'scale')"),
    # A leaf in the middle of the path: the next key is missing, not a TypeError.
    (('conv1', 'kernel', 'x'), "params: no entry 'conv1/kernel/x' (missing 'x')"),
])
def test_missing_entry_names_what_the_path_and_the_key(path, message):
  with pytest.raises(KeyError) as error:
    tree_util.lookup(TREE, path, what='params')
  assert error.value.args[0] == message
