"""The compositional Fashion-MNIST benchmark: grammar, groups, probe, splits and images."""

import collections
import re

import numpy as np
import pytest

from jaxdistill.data import compositional as comp
from jaxdistill.data.fashion_mnist import load_fashion_mnist

SMALL = dict(num_train=400, num_val=80, num_test=160)
_CELL_SLICES = [(slice(0, 28), slice(0, 28)), (slice(0, 28), slice(28, 56)),
                (slice(28, 56), slice(0, 28)), (slice(28, 56), slice(28, 56))]


@pytest.fixture(scope="module")
def fmnist():
  return load_fashion_mnist()


@pytest.fixture(scope="module")
def small(fmnist):
  return comp.build_benchmark(fmnist, seed=0, **SMALL)


@pytest.fixture(scope="module")
def default(fmnist):
  return comp.build_benchmark(fmnist, seed=0, num_train=8000, num_val=500, num_test=1000)


# ---------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("text, layout", [
    ("a sandal top left, a bag bottom left and a shirt bottom right", [5, -1, 8, 6]),
    ("two shirts on the right", [-1, 6, -1, 6]),
    ("two bags on top", [8, 8, -1, -1]),
    ("two pairs of trousers in the left column", [1, -1, 1, -1]),
    ("a sandal with a bag below it in the right column", [-1, 5, -1, 8]),
    ("a bag with a sandal above it on the left", [5, -1, 8, -1]),
    ("a coat above a dress on the left side", [4, -1, 3, -1]),
    ("a dress below a coat on the right", [-1, 4, -1, 3]),
    ("a coat left of a dress in the top row", [4, 3, -1, -1]),
    ("a dress to the right of a coat on the bottom", [-1, -1, 4, 3]),
    ("a coat to the left of a dress at the bottom", [-1, -1, 4, 3]),
    ("a dress right of a coat at the top", [4, 3, -1, -1]),
    ("a coat with a dress to its right on top", [4, 3, -1, -1]),
    ("a dress with a coat to its left in the bottom row", [-1, -1, 4, 3]),
    ("three items: a t-shirt top left, a shirt in the top right corner and an ankle boot at "
     "the bottom right", [0, 6, -1, 9]),
    ("there are four items: two sneakers on the bottom and a pullover left of a bag on top",
     [2, 8, 7, 7]),
    ("a single bag in the bottom right corner", [-1, -1, -1, 8]),
    ("only a bag in the top left", [8, -1, -1, -1]),
    ("there is one item: a sneaker in the bottom left", [-1, -1, 7, -1]),
])
def test_parse_hand_worked_captions(text, layout):
  np.testing.assert_array_equal(comp.parse_caption(text), np.array(layout, np.int8))


@pytest.mark.parametrize("text, complaint", [
    ("a bag top left and a coat top left", "twice"),
    ("two items: a bag top left", "announces 2 items"),
    ("only a bag top left and a coat top right", "only"),
    ("a single bag top left and a coat top right", "only"),
    ("a hat top left", "item name"),
    ("a bag somewhere", "'top' or 'bottom'"),
    ("a coat above a dress in the top row", "a column"),
    ("a coat left of a dress on the left", "a row"),
    ("a bag top left a coat top right", "',' or 'and'"),
])
def test_parse_rejects_text_outside_the_grammar(text, complaint):
  with pytest.raises(comp.CaptionParseError, match=re.escape(complaint)):
    comp.parse_caption(text)


@pytest.mark.parametrize("layout", [[5, -1, 8, 6], [6, -1, 6, -1], [-1, -1, -1, 8],
                                    [1, 1, 1, 0], [0, 9, 1, 3], [2, 2, 7, 7]])
def test_render_captions_are_distinct_complete_and_short(layout):
  layout = np.array(layout, np.int8)
  captions = comp.render_captions(layout, np.random.default_rng(0))
  assert len(captions) == 5 and len(set(captions)) == 5
  for caption in captions:
    np.testing.assert_array_equal(comp.parse_caption(caption), layout)
    assert len(re.findall(r"\w+|[^\w\s]", caption)) <= comp.MAX_CAPTION_WORDS


def test_render_captions_is_deterministic_in_the_rng():
  layout = np.array([3, -1, 4, 4], np.int8)
  first = comp.render_captions(layout, np.random.default_rng(7))
  assert first == comp.render_captions(layout, np.random.default_rng(7))
  assert first != comp.render_captions(layout, np.random.default_rng(8))


def test_four_identical_items_have_no_probe():
  with pytest.raises(ValueError, match="no two cells differ"):
    comp.render_captions(np.array([6, 6, 6, 6], np.int8), np.random.default_rng(0))


def test_all_templates_occur(default):
  captions = [c for caps in default["train"].captions for c in caps]
  for pattern in [r"^two \w+", r" two \w+ (on|in|at) ", r" (above|below) ", r" with .* it ",
                  r" (left|right) of ", r"^(there (is|are) )?\w+ items?:", r"^(only|just) ",
                  r"^a single "]:
    assert any(re.search(pattern, c) for c in captions), pattern


# ---------------------------------------------------------------------------------- splits


def test_sizes_ids_and_dtypes(small):
  ids = np.concatenate([small[s].image_ids for s in comp.SPLITS])
  groups = np.concatenate([small[s].group_ids for s in comp.SPLITS])
  assert len(set(ids.tolist())) == len(ids) == sum(SMALL.values())
  assert len(set(groups.tolist())) == len(groups) // 4
  for name, size in zip(comp.SPLITS, SMALL.values()):
    split = small[name]
    assert split.images.shape == (size, 56, 56) and split.images.dtype == np.uint8
    assert split.layouts.shape == (size, 4) and split.layouts.dtype == np.int8
    assert split.image_ids.dtype == np.int32 and split.group_ids.dtype == np.int32
    assert len(split.captions) == len(split.probe_true) == len(split.probe_false) == size
    assert all(len(caps) == 5 for caps in split.captions)


def test_same_seed_same_benchmark_other_seed_other_benchmark(fmnist, small):
  again = comp.build_benchmark(fmnist, seed=0, **SMALL)
  other = comp.build_benchmark(fmnist, seed=1, **SMALL)
  for name in comp.SPLITS:
    for field in ("images", "layouts", "image_ids", "group_ids", "source_indices"):
      np.testing.assert_array_equal(getattr(small[name], field), getattr(again[name], field))
    assert small[name].captions == again[name].captions
    assert small[name].probe_false == again[name].probe_false
    assert not np.array_equal(small[name].layouts, other[name].layouts)
    assert small[name].captions != other[name].captions


def test_every_caption_parses_to_its_own_layout(small):
  for name in comp.SPLITS:
    split = small[name]
    for layout, captions in zip(split.layouts, split.captions):
      assert len(set(captions)) == 5
      for caption in captions:
        np.testing.assert_array_equal(comp.parse_caption(caption), layout)


def test_probe_false_is_a_minimal_rearrangement(small):
  for name in comp.SPLITS:
    split = small[name]
    assert split.probe_true == [caps[0] for caps in split.captions]
    for layout, true, false in zip(split.layouts, split.probe_true, split.probe_false):
      false_layout = comp.parse_caption(false)
      assert not np.array_equal(false_layout, layout)
      np.testing.assert_array_equal(np.sort(false_layout), np.sort(layout))
      # Two cells exchanged, and the same wording: the same number of words.
      assert int(np.sum(false_layout != layout)) == 2
      assert len(false.split()) == len(true.split())


def test_probe_swaps_items_in_place_when_it_can():
  # Every cell filled with distinct items: the edit exchanges two nouns and nothing else.
  layout = np.array([0, 3, 5, 8], np.int8)
  for seed in range(5):
    captions, false = comp._captions_and_probe(layout, np.random.default_rng(seed), 5)
    names = ("t-shirt", "dress", "sandal", "bag")
    strip = lambda text: re.sub("|".join(names), "ITEM", text)
    assert strip(false) == strip(captions[0]) and false != captions[0]


def test_layouts_unique_within_each_split(default):
  for name in comp.SPLITS:
    layouts = default[name].layouts
    assert len(np.unique(layouts, axis=0)) == len(layouts)
    assert np.all(np.sum(layouts >= 0, axis=1) >= 1)  # at least one item


def _check_sources(split, images, labels):
  filled = split.layouts >= 0
  np.testing.assert_array_equal(split.source_indices >= 0, filled)
  used = split.source_indices[filled]
  assert len(np.unique(used)) == len(used)  # no source image twice within a split
  np.testing.assert_array_equal(labels[used], split.layouts[filled])
  for cell, (rows, cols) in enumerate(_CELL_SLICES):
    block = split.images[:, rows, cols]
    on = filled[:, cell]
    np.testing.assert_array_equal(block[on], images[split.source_indices[on, cell]])
    assert not block[~on].any()
  return set(used.tolist())


def test_images_hold_the_source_items_and_splits_share_no_source(fmnist, default):
  _check_sources(default["train"], fmnist.train_images, fmnist.train_labels)
  val = _check_sources(default["val"], fmnist.test_images, fmnist.test_labels)
  test = _check_sources(default["test"], fmnist.test_images, fmnist.test_labels)
  assert not val & test


def test_default_sizes_and_groups(default):
  assert [len(default[s].layouts) for s in comp.SPLITS] == [8000, 500, 1000]
  assert len(np.unique(default["test"].group_ids)) == 250


def _is_item_swap(a, b):
  differ = np.flatnonzero(a != b)
  return (len(differ) == 2 and np.all(a[differ] >= 0) and np.all(b[differ] >= 0)
          and a[differ[0]] == b[differ[1]] and a[differ[1]] == b[differ[0]])


def test_group_structure(small):
  for name in comp.SPLITS:
    split = small[name]
    groups = collections.defaultdict(list)
    for k, group in enumerate(split.group_ids):
      groups[group].append(k)
    num_swap = 0
    for members in groups.values():
      assert len(members) == 4
      assert np.all(np.diff(members) == 1)  # examples stored group by group
      layouts = split.layouts[members]
      sorted_cells = np.sort(layouts, axis=1)
      assert np.all(sorted_cells == sorted_cells[0])  # one multiset of items per group
      assert len(np.unique(layouts, axis=0)) == 4
      kinds = split.is_swap_group[members]
      assert np.all(kinds == kinds[0])
      if kinds[0]:
        num_swap += 1
        assert any(all(_is_item_swap(layouts[base], layouts[other])
                       for other in range(4) if other != base) for base in range(4))
    assert num_swap == round(0.5 * len(groups))


def test_swap_fraction_and_group_size_one(fmnist):
  bench = comp.build_benchmark(fmnist, seed=3, num_train=40, num_val=8, num_test=8,
                               group_size=1, swap_fraction=0.0)
  train = bench["train"]
  assert len(np.unique(train.group_ids)) == 40 and not train.is_swap_group.any()
  all_swaps = comp.build_benchmark(fmnist, seed=3, num_train=40, num_val=8, num_test=8,
                                   swap_fraction=1.0)
  assert all_swaps["train"].is_swap_group.all()


@pytest.mark.parametrize("kwargs, complaint", [
    (dict(num_train=10), "num_train=10 must be a positive multiple of group_size=4"),
    (dict(num_val=0), "num_val=0"),
    (dict(group_size=8, num_train=16, num_val=8, num_test=8), "group_size=8"),
    (dict(swap_fraction=1.5), "swap_fraction"),
    (dict(num_train=7000, num_val=7, num_test=7, group_size=7, swap_fraction=1.0), "ran out"),
])
def test_bad_arguments_raise(fmnist, kwargs, complaint):
  args = dict(seed=0, num_train=8, num_val=8, num_test=8) | kwargs
  with pytest.raises(ValueError, match=re.escape(complaint)):
    comp.build_benchmark(fmnist, **args)


# ---------------------------------------------------------------------------- normalisation


def test_normalisation_constants_match_the_default_train_split(default):
  pixels = default["train"].images.astype(np.float64) / 255
  assert abs(pixels.mean() - comp.IMAGE_MEAN) < 5e-4
  assert abs(pixels.std() - comp.IMAGE_STD) < 5e-4


def test_normalize_images_hand_values():
  images = np.zeros((2, 56, 56), np.uint8)
  images[1, 3, 4] = 255
  out = comp.normalize_images(images)
  assert out.shape == (2, 56, 56, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0, 0], -0.2628 / 0.3470, rtol=1e-5)
  np.testing.assert_allclose(out[1, 3, 4, 0], (1 - 0.2628) / 0.3470, rtol=1e-5)


def test_layout_space_and_item_swaps():
  """11^4 layouts; usable: not all-empty, not four identical items (which have no probe)."""
  space = comp._layout_space()
  assert len(space.layouts) == 11 ** 4 and space.usable.sum() == 11 ** 4 - 1 - 10
  layout = np.array([0, 3, -1, 3], np.int8)
  index = comp._layout_index(layout[None])[0]
  np.testing.assert_array_equal(space.layouts[index], layout)
  swaps = {tuple(space.layouts[k].tolist()) for k in space.item_swaps[index] if k >= 0}
  assert swaps == {(3, 0, -1, 3), (3, 3, -1, 0)}  # 3<->3 and moves into the empty cell excluded
