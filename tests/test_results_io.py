"""experiments/results_io.py: results files are replaced whole or not at all."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))
import results_io  # pylint: disable=g-import-not-at-top


def test_json_round_trip_creates_the_directory(tmp_path):
  path = tmp_path / 'new' / 'dir' / 'bench.json'
  payload = {'ratio': 1.07, 'rounds': [1.05, 1.09], 'model': 'shapes_paper'}
  results_io.write_json_atomic(str(path), payload)
  assert json.loads(path.read_text()) == payload
  assert path.read_text().endswith('\n')
  assert os.listdir(path.parent) == ['bench.json']  # no temporary file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'bench.json'
  results_io.write_json_atomic(str(path), {'ratio': 1.07})
  with pytest.raises(TypeError, match='not JSON serializable'):
    results_io.write_json_atomic(str(path), {'ratio': object()})
  assert json.loads(path.read_text()) == {'ratio': 1.07}
  assert os.listdir(tmp_path) == ['bench.json']


def test_text_write_replaces_the_whole_file(tmp_path):
  path = tmp_path / 'RESULTS.md'
  results_io.write_text_atomic(str(path), 'a much longer first version\n' * 10)
  results_io.write_text_atomic(str(path), 'short\n')
  assert path.read_text() == 'short\n'


def test_error_while_writing_removes_the_temporary_and_keeps_the_old_file(tmp_path):
  path = tmp_path / 'RESULTS.md'
  results_io.write_text_atomic(str(path), 'old\n')
  with pytest.raises(TypeError):
    results_io.write_text_atomic(str(path), 123)  # fails inside the temporary file's write
  assert path.read_text() == 'old\n'
  assert os.listdir(tmp_path) == ['RESULTS.md']
