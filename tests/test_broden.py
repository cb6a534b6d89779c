"""Tests of the Broden reader/writer (cgl_jax/data/broden.py): round trips, the real format's
quirks (multi-category labels, part layers, image-level ids), atomic writes and error messages."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from cgl_jax.data import broden

CONCEPTS = [('red', 'colour'), ('green', 'colour'), ('square', 'shape'), ('circle', 'shape'),
            ('indoor', 'scene')]


def _fixture_arrays():
  """3 images of 4×6 pixels; colour and shape per pixel, scene per image."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 4, 6, 3), dtype=np.uint8)
  colour = np.zeros((3, 4, 6), np.int32)
  colour[0, :2, :3] = 1  # red: 6 px of 24
  colour[1, 1:, :] = 2  # green: 18 px
  shape = np.zeros((3, 4, 6), np.int32)
  shape[0, :2, :2] = 3  # square: 4 px
  shape[0, 3, 5] = 4  # circle: 1 px
  # image 2 has no pixel labels at all
  scene = [[5], [], [5]]
  return images, {'colour': colour, 'shape': shape}, {'scene': scene}


@pytest.fixture
def written(tmp_path):
  images, pixel, image_level = _fixture_arrays()
  directory = broden.write_broden(str(tmp_path / 'probe'), images=images, concepts=CONCEPTS,
                                  pixel_labels=pixel, image_labels=image_level)
  return directory, images, pixel, image_level


def test_label_png_round_trip(tmp_path):
  ids = np.array([[0, 1, 255], [256, 1197, 65535]])
  path = str(tmp_path / 'seg.png')
  rgb = broden.encode_label_png(ids)
  np.testing.assert_array_equal(rgb[1, 1], [1197 % 256, 1197 // 256, 0])
  Image.fromarray(rgb).save(path)
  np.testing.assert_array_equal(broden.decode_label_png(path), ids)


def test_written_files_have_broden_layout(written):
  directory, *_ = written
  with open(os.path.join(directory, 'index.csv')) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image', 'split', 'ih', 'iw', 'sh', 'sw', 'colour', 'shape', 'scene']
  assert rows[1] == ['000000.png', 'val', '4', '6', '4', '6', '000000_colour.png',
                     '000000_shape.png', '5']
  assert rows[3] == ['000002.png', 'val', '4', '6', '4', '6', '', '', '5']  # no labels → ''
  with open(os.path.join(directory, 'category.csv')) as f:
    assert list(csv.reader(f)) == [['name', 'first', 'last', 'count', 'frequency'],
                                   ['colour', '1', '2', '2', '2'], ['shape', '3', '4', '2', '1'],
                                   ['scene', '5', '5', '1', '2']]
  with open(os.path.join(directory, 'label.csv')) as f:
    labels = list(csv.reader(f))
  assert labels[0] == ['number', 'name', 'category', 'frequency', 'coverage', 'syns']
  assert labels[2] == ['2', 'green', 'colour(1)', '1', '0.750000', '']  # 18/24 of one image
  assert labels[5] == ['5', 'indoor', 'scene(2)', '2', '2.000000', '']
  with open(os.path.join(directory, 'c_shape.csv')) as f:
    assert list(csv.reader(f))[1:] == [['1', '3', 'square', '1', '0.166667'],
                                       ['2', '4', 'circle', '1', '0.041667']]


def test_reader_round_trip(written):
  directory, images, pixel, image_level = written
  data = broden.Broden(directory)
  assert len(data) == 3
  assert data.categories == ('colour', 'shape', 'scene')
  assert data.label_names() == ('', 'red', 'green', 'square', 'circle', 'indoor')
  assert [l.category for l in data.labels[1:]] == ['colour', 'colour', 'shape', 'shape', 'scene']
  assert data.labels[1].frequency == 1 and data.labels[1].coverage == pytest.approx(0.25)
  np.testing.assert_array_equal(data.primary_category_index(), [-1, 0, 0, 1, 1, 2])
  batches = list(data.batches(batch_size=2))
  assert [b['index'].tolist() for b in batches] == [[0, 1], [2]]
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in batches]), images)  # lossless
  for category in ('colour', 'shape'):
    got = np.concatenate([b['pixel_labels'][category] for b in batches])
    assert got.shape == (3, 1, 4, 6) and got.dtype == np.int32
    np.testing.assert_array_equal(got[:, 0], pixel[category])
  assert 'scene' not in batches[0]['pixel_labels']
  np.testing.assert_array_equal(
      np.concatenate([b['image_labels']['scene'] for b in batches]), [[5], [0], [5]])


def test_reader_resizes_images_and_resamples_segmentations(written):
  directory, images, pixel, _ = written
  batch = next(broden.Broden(directory).batches(batch_size=3, image_size=8,
                                                segmentation_size=(8, 12)))
  assert batch['image'].shape == (3, 8, 8, 3)
  expected = np.asarray(Image.fromarray(images[1]).resize((8, 8), Image.BILINEAR))
  np.testing.assert_array_equal(batch['image'][1], expected)
  # Nearest-neighbour ×2 upsampling repeats every label pixel into a 2×2 block.
  np.testing.assert_array_equal(batch['pixel_labels']['colour'][:, 0],
                                pixel['colour'].repeat(2, axis=1).repeat(2, axis=2))


def test_real_broden_format(tmp_path):
  """A hand-written directory in the real Broden's layout: jpg images, a label in two categories
  (primary = the one of larger coverage in c_<cat>.csv), part layers, image-level ids."""
  root = tmp_path / 'broden1_224'
  (root / 'images' / 'ade20k').mkdir(parents=True)
  Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(root / 'images/ade20k/a.jpg')
  Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / 'images/ade20k/b.jpg')
  obj = np.zeros((5, 5), int)
  obj[1:3, 1:3] = 3
  part1, part2 = np.full((5, 5), 4), np.zeros((5, 5), int)
  part2[0, 0] = 300  # ids above 255 use the green channel
  for name, ids in [('a_object', obj), ('a_part_1', part1), ('a_part_2', part2)]:
    Image.fromarray(broden.encode_label_png(ids)).save(root / f'images/ade20k/{name}.png')
  (root / 'index.csv').write_text(
      'image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n'
      'ade20k/a.jpg,train,10,10,5,5,,ade20k/a_object.png,'
      'ade20k/a_part_1.png;ade20k/a_part_2.png,,7;8,\n'
      'ade20k/b.jpg,val,10,10,5,5,,,,,,9\n')
  categories = ['color', 'object', 'part', 'material', 'scene', 'texture']
  (root / 'category.csv').write_text(
      'name,first,last,count,frequency\n' + ''.join(f'{c},1,1,1,1\n' for c in categories))
  (root / 'label.csv').write_text(
      'number,name,category,frequency,coverage,syns\n'
      '1,red-c,color(2),2,1.5,\n'
      '3,fabric,material(36);object(3),39,4.225474,cloth\n'
      '4,wheel,part(5),5,0.5,\n'
      '7,street,scene(1),1,1.0,\n8,alley,scene(1),1,1.0,\n9,dotted,texture(1),1,1.0,\n'
      '300,handle,part(1),1,0.1,\n')
  c_rows = {'color': ['1,1,red-c,2,1.5'], 'object': ['1,3,fabric,3,0.2'],
            'material': ['1,3,fabric,36,4.0'], 'part': ['1,4,wheel,5,0.5', '2,300,handle,1,0.1'],
            'scene': ['1,7,street,1,1.0', '2,8,alley,1,1.0'], 'texture': ['1,9,dotted,1,1.0']}
  for c in categories:
    (root / f'c_{c}.csv').write_text('code,number,name,frequency,coverage\n' +
                                     ''.join(r + '\n' for r in c_rows[c]))
  data = broden.Broden(str(root))
  assert len(data) == 2 and data.num_labels == 301
  assert data.labels[3].category == 'material'  # coverage 4.0 in material > 0.2 in object
  # Restricted to some categories, the primary one is chosen among those (as the reference).
  np.testing.assert_array_equal(data.primary_category_index(['object', 'part'])[[1, 3, 4, 300]],
                                [-1, 0, 1, 1])
  assert dict(data.labels[3].categories) == {'material': 36, 'object': 3}
  assert data.labels[2].name == '' and data.labels[300].name == 'handle'
  assert data.max_layers()['part'] == 2
  assert len(broden.Broden(str(root), split='val')) == 1
  batch = next(data.batches(batch_size=2, image_size=4))
  assert batch['image'].shape == (2, 4, 4, 3)
  assert batch['pixel_labels']['part'].shape == (2, 2, 5, 5)
  np.testing.assert_array_equal(batch['pixel_labels']['part'][0, 0], part1)
  assert batch['pixel_labels']['part'][0, 1, 0, 0] == 300
  assert not batch['pixel_labels']['part'][1].any()  # image b has no parts
  np.testing.assert_array_equal(batch['pixel_labels']['object'][0, 0], obj)
  np.testing.assert_array_equal(batch['image_labels']['scene'], [[7, 8], [0, 0]])
  np.testing.assert_array_equal(batch['image_labels']['texture'], [[0], [9]])


def test_malformed_index_row_names_file_line_and_expectation(written):
  directory, *_ = written
  index = os.path.join(directory, 'index.csv')
  lines = open(index).read().splitlines()
  lines[2] += ',extra'
  open(index, 'w').write('\n'.join(lines) + '\n')
  with pytest.raises(broden.BrodenFormatError) as error:
    broden.Broden(directory)
  assert str(error.value) == (
      f"{index}, line 3: expected 9 fields (image,split,ih,iw,sh,sw,colour,shape,scene), got 10: "
      f"'000001.png,val,4,6,4,6,000001_colour.png,,,extra'")
  lines[2] = '000001.png,val,4,six,4,6,,,'
  open(index, 'w').write('\n'.join(lines) + '\n')
  with pytest.raises(broden.BrodenFormatError,
                     match=r"index.csv, line 3: column 'iw' must be an integer ≥ 1, got 'six'"):
    broden.Broden(directory)
  lines[2] = '000001.png,val,4,6,4,6,,,12'
  open(index, 'w').write('\n'.join(lines) + '\n')
  with pytest.raises(broden.BrodenFormatError,
                     match=r"line 3: column 'scene' has label id 12, expected an id in 1..5"):
    broden.Broden(directory)


def test_missing_files_are_named(written):
  directory, *_ = written
  os.remove(os.path.join(directory, 'images', '000001_colour.png'))
  data = broden.Broden(directory)
  with pytest.raises(FileNotFoundError, match='000001_colour.png'):
    list(data.batches(batch_size=2))
  os.remove(os.path.join(directory, 'c_shape.csv'))
  with pytest.raises(FileNotFoundError,
                     match=f'Broden file missing: {os.path.join(directory, "c_shape.csv")}'):
    broden.Broden(directory)


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
  images, pixel, image_level = _fixture_arrays()
  target = str(tmp_path / 'probe')
  broden.write_broden(target, images=images, concepts=CONCEPTS, pixel_labels=pixel)
  with pytest.raises(FileExistsError, match='overwrite=True'):
    broden.write_broden(target, images=images, concepts=CONCEPTS, pixel_labels=pixel)
  # A failure half-way leaves the previous data set untouched and no temp dirs behind.
  saved = []
  original_save = Image.Image.save

  def failing_save(self, *args, **kwargs):
    if len(saved) == 3:
      raise OSError('disk full')
    saved.append(args)
    return original_save(self, *args, **kwargs)

  monkeypatch.setattr(Image.Image, 'save', failing_save)
  with pytest.raises(OSError, match='disk full'):
    broden.write_broden(target, images=images, concepts=CONCEPTS, pixel_labels=pixel,
                        image_labels=image_level, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['probe']
  assert broden.Broden(target).labels[5].frequency == 0  # still the first version (no scene)
  broden.write_broden(target, images=images, concepts=CONCEPTS, pixel_labels=pixel,
                      image_labels=image_level, overwrite=True)
  assert broden.Broden(target).labels[5].frequency == 2
  assert sorted(os.listdir(tmp_path)) == ['probe']


@pytest.mark.parametrize('change, message', [
    (dict(pixel_labels={'colour': np.full((3, 4, 6), 3)}),
     r"pixel_labels\['colour'\] holds label ids \[3\] that are not concepts of category"),
    (dict(pixel_labels={'texture': np.zeros((3, 4, 6), int)}),
     r"pixel_labels has category 'texture', which no concept has"),
    (dict(image_labels={'scene': [[5]]}),
     r"image_labels\['scene'\] must have one list per image \(N=3\); got 1"),
    (dict(images=np.zeros((3, 4, 6), np.uint8)), r'images must be uint8 \[N, H, W, 3\]'),
    (dict(concepts=CONCEPTS + [('red', 'shape')]), "duplicate concept name 'red'"),
])
def test_writer_rejects_bad_input(tmp_path, change, message):
  images, pixel, _ = _fixture_arrays()
  kwargs = dict(images=images, concepts=CONCEPTS, pixel_labels=pixel) | change
  with pytest.raises(ValueError, match=message):
    broden.write_broden(str(tmp_path / 'probe'), **kwargs)
  assert not os.listdir(tmp_path)


def test_trimmed_category_csv_and_category_subset(written):
  """A category.csv without a category that index.csv still has a column for (NetDissect-Lite
  users drop 'material' this way) reads as the remaining categories; `categories=` picks a
  subset and, as the reference, leaves out images with no label in it."""
  directory, images, pixel, _ = written
  path = os.path.join(directory, 'category.csv')
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join(line for line in lines if not line.startswith('shape,')) + '\n')
  trimmed = broden.Broden(directory)
  assert trimmed.categories == ('colour', 'scene') and len(trimmed) == 3
  assert trimmed.labels[3].name == 'square' and trimmed.labels[3].category == ''
  batch = next(trimmed.batches(batch_size=3))
  assert set(batch['pixel_labels']) == {'colour'} and set(batch['image_labels']) == {'scene'}

  subset = broden.Broden(directory, categories=['colour'])
  assert subset.categories == ('colour',)
  assert len(subset) == 2  # image 2 has a scene label but no colour
  (batch,) = subset.batches(batch_size=3)
  np.testing.assert_array_equal(batch['index'], [0, 1])
  np.testing.assert_array_equal(batch['image'], images[:2])
  np.testing.assert_array_equal(batch['pixel_labels']['colour'][:, 0], pixel['colour'][:2])
  np.testing.assert_array_equal(subset.primary_category_index(), [-1, 0, 0, -1, -1, -1])
  with pytest.raises(ValueError, match=r"categories \['shape'\] are not in .*category.csv "
                                       r"\(colour, scene\)"):
    broden.Broden(directory, categories=['colour', 'shape'])
  with pytest.raises(ValueError, match='categories must be a non-empty sequence'):
    broden.Broden(directory, categories='colour')
