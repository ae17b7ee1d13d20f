"""The bundled benchmark: compositional Fashion-MNIST retrieval, generated deterministically from a
seed. This module owns layouts, the caption grammar (renderer and parser), look-alike / swap
groups, the binding probe, the split generator and image normalisation.

An example is a 2x2 grid image (uint8 [56, 56]); cells TL, TR, BL, BR (in that order) each hold
one Fashion-MNIST item or are empty (black). Its layout is int8 [4]: the class id per cell, -1 for
an empty cell. Every caption describes the layout completely (unmentioned cells are empty), so a
caption is true of exactly one layout, and the generator checks `parse_caption(c) == layout` for
every caption it writes. Hard negatives come in groups: look-alike groups (the same items in
different cells) and swap groups (a base layout and copies with two cells' items exchanged), so
that retrieval needs binding of items to positions rather than a bag of items.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import chex
import numpy as np

from jaxdistill.data.fashion_mnist import (CLASS_NAMES, CLASS_PLURALS, IMAGE_SIZE, NUM_CLASSES,
                                           FashionMnist)

NUM_CELLS = 4
GRID_SIZE = 2 * IMAGE_SIZE
EMPTY = -1
CAPTIONS_PER_IMAGE = 5
SPLITS = ("train", "val", "test")
SPLIT_ID_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # image and group ids

# Pixel statistics of the 0..1 grid images, empty cells included, measured on the default train
# split (seed 0, 8,000 images; ~1/11 of cells are empty, so the mean is below Fashion-MNIST's
# 0.286 and the std near its 0.353). tests/test_data_compositional.py re-measures them.
IMAGE_MEAN = 0.2628
IMAGE_STD = 0.3470

_ROW_WORDS = ("top", "bottom")
_COL_WORDS = ("left", "right")
_ROW_OF = (0, 0, 1, 1)  # cell -> row (0 top, 1 bottom)
_COL_OF = (0, 1, 0, 1)  # cell -> column (0 left, 1 right)
_CELL_AT = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}
_ROWS = ((0, 1), (2, 3))  # (left cell, right cell) per row
_COLUMNS = ((0, 2), (1, 3))  # (top cell, bottom cell) per column
_CELL_PAIRS = tuple(itertools.combinations(range(NUM_CELLS), 2))
_NUMBER_WORDS = ("one", "two", "three", "four")
# Longest caption in words and punctuation marks (as BERT's pre-tokenizer splits them, so
# "t-shirt" counts 3), so that [CLS] caption [SEP] fits a 32-token text encoder.
MAX_CAPTION_WORDS = 30

# Wordings. A cell position, e.g. "in the top left corner".
_POSITION_WORDINGS = ("{r} {c}", "in the {r} {c}", "in the {r} {c} corner", "at the {r} {c}")
# A whole row / column.
_ROW_WORDINGS = (("on top", "in the top row", "at the top"),
                 ("on the bottom", "in the bottom row", "at the bottom"))
_COLUMN_WORDINGS = (("on the left", "in the left column", "on the left side"),
                    ("on the right", "in the right column", "on the right side"))
_NUM_LINE_WORDINGS = 3
# Relations: {a} top / left item, {b} bottom / right item, {line} the column / row anchor.
_VERTICAL_WORDINGS = ("{a} above {b} {line}", "{b} below {a} {line}",
                      "{a} with {b} below it {line}", "{b} with {a} above it {line}")
_HORIZONTAL_WORDINGS = ("{a} left of {b} {line}", "{a} to the left of {b} {line}",
                        "{b} to the right of {a} {line}", "{b} right of {a} {line}",
                        "{a} with {b} to its right {line}", "{b} with {a} to its left {line}")
_COUNT_WORDINGS = ("{n} {items}: ", "there {are} {n} {items}: ")
_SINGLE_PREFIXES = ("only", "just", "single")  # "single" renders as "a single bag ..."


class CaptionParseError(ValueError):
  """A caption is not a sentence of the benchmark grammar, or contradicts itself."""


# --------------------------------------------------------------------------------------------
# Caption plans: which clauses describe which cells, in which wording. A plan is realised on a
# layout; the binding probe realises the same plan on a layout with two cells swapped.


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One clause. kind "cell": cells (c,); "group": a row/column, both cells one class;
  "vertical": (top cell, bottom cell); "horizontal": (left cell, right cell)."""
  kind: str
  cells: tuple[int, ...]
  wording: int


@dataclasses.dataclass(frozen=True)
class _Plan:
  prefix: str  # "", "count", or one of _SINGLE_PREFIXES
  prefix_wording: int
  units: tuple[_Unit, ...]


def _noun_phrase(class_id: int, single: bool = False) -> str:
  name = CLASS_NAMES[class_id]
  if single:
    return f"a single {name}"
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _line_phrase(cells: tuple[int, int], wording: int) -> str:
  if cells in _ROWS:
    return _ROW_WORDINGS[_ROWS.index(cells)][wording]
  return _COLUMN_WORDINGS[_COLUMNS.index(cells)][wording]


def _unit_fits(unit: _Unit, layout: np.ndarray) -> bool:
  items = [int(layout[c]) for c in unit.cells]
  if any(item == EMPTY for item in items):
    return False
  if unit.kind == "group":
    return unit.cells in _ROWS + _COLUMNS and items[0] == items[1]
  if unit.kind == "vertical":
    return unit.cells in _COLUMNS
  if unit.kind == "horizontal":
    return unit.cells in _ROWS
  return True


def _realise(plan: _Plan, layout: np.ndarray) -> str | None:
  """The caption `plan` gives for `layout`, or None where the plan does not describe it."""
  covered = sorted(c for unit in plan.units for c in unit.cells)
  filled = [c for c in range(NUM_CELLS) if layout[c] != EMPTY]
  if covered != filled or not all(_unit_fits(u, layout) for u in plan.units):
    return None
  single = plan.prefix == "single"
  if plan.prefix in _SINGLE_PREFIXES and len(filled) != 1:
    return None
  clauses = []
  for unit in plan.units:
    items = [int(layout[c]) for c in unit.cells]
    if unit.kind == "cell":
      cell = unit.cells[0]
      position = _POSITION_WORDINGS[unit.wording].format(r=_ROW_WORDS[_ROW_OF[cell]],
                                                         c=_COL_WORDS[_COL_OF[cell]])
      clauses.append(f"{_noun_phrase(items[0], single)} {position}")
    elif unit.kind == "group":
      clauses.append(f"two {CLASS_PLURALS[items[0]]} {_line_phrase(unit.cells, unit.wording)}")
    else:
      wordings = _VERTICAL_WORDINGS if unit.kind == "vertical" else _HORIZONTAL_WORDINGS
      phrasing, line = divmod(unit.wording, _NUM_LINE_WORDINGS)
      clauses.append(wordings[phrasing].format(a=_noun_phrase(items[0]),
                                               b=_noun_phrase(items[1]),
                                               line=_line_phrase(unit.cells, line)))
  text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
  if plan.prefix == "count":
    n = len(filled)
    text = _COUNT_WORDINGS[plan.prefix_wording].format(
        n=_NUMBER_WORDS[n - 1], items="item" if n == 1 else "items",
        are="is" if n == 1 else "are") + text
  elif plan.prefix in ("only", "just"):
    text = f"{plan.prefix} {text}"
  return text


def _filled_lines(layout: np.ndarray, same_class: bool) -> list[tuple[int, int]]:
  """Rows and columns whose two cells are both filled (and, if same_class, hold one class)."""
  return [line for line in _ROWS + _COLUMNS
          if layout[line[0]] != EMPTY and layout[line[1]] != EMPTY
          and (not same_class or layout[line[0]] == layout[line[1]])]


def _plan_units(layout: np.ndarray, rng: np.random.Generator, lines: list[tuple[int, int]],
                kind_of_line) -> tuple[_Unit, ...]:
  """Covers the filled cells: a random non-empty disjoint subset of `lines` (greedy over a
  shuffled order) as pair clauses, the remaining cells as cell clauses; clauses shuffled."""
  chosen, used = [], set()
  for k in rng.permutation(len(lines)):
    line = lines[k]
    if not used & set(line) and (not chosen or rng.random() < 0.5):
      chosen.append(line)
      used |= set(line)
  position_wording = int(rng.integers(len(_POSITION_WORDINGS)))
  units = [_Unit("cell", (c,), position_wording)
           for c in range(NUM_CELLS) if layout[c] != EMPTY and c not in used]
  for line in chosen:
    kind = kind_of_line(line)
    count = _NUM_LINE_WORDINGS * {"group": 1, "vertical": len(_VERTICAL_WORDINGS),
                                  "horizontal": len(_HORIZONTAL_WORDINGS)}[kind]
    units.append(_Unit(kind, line, int(rng.integers(count))))
  return tuple(units[k] for k in rng.permutation(len(units)))


def _listing_plan(layout, rng) -> _Plan:
  return _Plan("", 0, _plan_units(layout, rng, [], None))


def _grouping_plan(layout, rng) -> _Plan:
  return _Plan("", 0, _plan_units(layout, rng, _filled_lines(layout, True), lambda _: "group"))


def _relation_plan(layout, rng) -> _Plan:
  kind = lambda line: "horizontal" if line in _ROWS else "vertical"
  return _Plan("", 0, _plan_units(layout, rng, _filled_lines(layout, False), kind))


def _count_plan(layout, rng) -> _Plan:
  bases = [_listing_plan] + [_relation_plan] * bool(_filled_lines(layout, False))
  base = bases[int(rng.integers(len(bases)))](layout, rng)
  return _Plan("count", int(rng.integers(len(_COUNT_WORDINGS))), base.units)


def _single_plan(layout, rng) -> _Plan:
  prefix = _SINGLE_PREFIXES[int(rng.integers(len(_SINGLE_PREFIXES)))]
  return _Plan(prefix, 0, _listing_plan(layout, rng).units)


def _templates(layout: np.ndarray) -> list:
  templates = [_listing_plan, _count_plan]
  if _filled_lines(layout, True):
    templates.append(_grouping_plan)
  if _filled_lines(layout, False):
    templates.append(_relation_plan)
  if int(np.sum(layout != EMPTY)) == 1:
    templates.append(_single_plan)
  return templates


def _swapped(layout: np.ndarray, i: int, j: int) -> np.ndarray:
  out = layout.copy()
  out[[i, j]] = layout[[j, i]]
  return out


def _false_caption(plan: _Plan, layout: np.ndarray, rng: np.random.Generator) -> str | None:
  """The plan realised on `layout` with two cells of different content swapped: preferably the
  items exchanged in place ("X above Y" -> "Y above X"); else, for an item swapped with an empty
  cell, the clause moved with its item. None if no swap keeps the plan's wording valid."""
  swaps = [_CELL_PAIRS[k] for k in rng.permutation(len(_CELL_PAIRS))]
  swaps = [(i, j) for i, j in swaps if layout[i] != layout[j]]
  for i, j in swaps:  # items exchanged, clauses stay
    text = _realise(plan, _swapped(layout, i, j))
    if text is not None:
      return text
  for i, j in swaps:  # clauses follow their items; a row stays a row, a column a column
    moved = {c: c for c in range(NUM_CELLS)} | {i: j, j: i}
    units = tuple(dataclasses.replace(u, cells=tuple(moved[c] for c in u.cells))
                  for u in plan.units)
    if any((old.cells in _ROWS) != (new.cells in _ROWS) for old, new in zip(plan.units, units)):
      continue
    text = _realise(dataclasses.replace(plan, units=units), _swapped(layout, i, j))
    if text is not None:
      return text
  return None


def _captions_and_probe(layout: np.ndarray, rng: np.random.Generator,
                        n: int) -> tuple[list[str], str]:
  """n distinct captions of `layout` (the first one has a minimally edited false twin) and that
  false caption."""
  templates = _templates(layout)
  templates = [templates[k] for k in rng.permutation(len(templates))]
  captions: dict[str, _Plan] = {}
  for attempt in range(50 * n):
    if len(captions) == n:
      break
    plan = templates[attempt % len(templates)](layout, rng)
    text = _realise(plan, layout)
    if len(re.findall(r"\w+|[^\w\s]", text)) <= MAX_CAPTION_WORDS:
      captions.setdefault(text, plan)
  if len(captions) < n:
    raise ValueError(f"layout {layout.tolist()}: the grammar gave only {len(captions)} distinct "
                     f"captions, fewer than the {n} asked for; ask for fewer captions")
  texts = list(captions)
  for k in rng.permutation(n):
    false = _false_caption(captions[texts[k]], layout, rng)
    if false is not None:
      return [texts[k]] + texts[:k] + texts[k + 1:], false
  raise ValueError(f"layout {layout.tolist()}: no two cells differ, so it has no binding-probe "
                   "false caption; layouts of four identical items are not in the benchmark")


def render_captions(layout: np.ndarray, rng: np.random.Generator,
                    n: int = CAPTIONS_PER_IMAGE) -> list[str]:
  """n distinct captions, each a complete description of `layout` (int8 [4]) in at most
  MAX_CAPTION_WORDS words, in varied templates: cell listing, row/column grouping, relations,
  count-first, single item."""
  return _captions_and_probe(np.asarray(layout, np.int8), rng, n)[0]


# --------------------------------------------------------------------------------------------
# Parsing.

_CLASS_TOKENS = sorted(((tuple(name.split()), k) for k, name in enumerate(CLASS_NAMES)),
                       key=lambda item: -len(item[0]))
_PLURAL_TOKENS = sorted(((tuple(name.split()), k) for k, name in enumerate(CLASS_PLURALS)),
                        key=lambda item: -len(item[0]))


class _Parser:
  """Recursive descent over the caption grammar (see parse_caption)."""

  def __init__(self, text: str):
    self.text = text
    self.tokens = re.findall(r"[a-z]+(?:-[a-z]+)*|\S", text.lower())
    self.pos = 0
    self.single = False

  def fail(self, expected: str):
    found = " ".join(self.tokens[self.pos:self.pos + 3]) or "the end"
    raise CaptionParseError(f"caption {self.text!r}: expected {expected} at {found!r}")

  def accept(self, *words: str) -> bool:
    if tuple(self.tokens[self.pos:self.pos + len(words)]) == words:
      self.pos += len(words)
      return True
    return False

  def expect(self, *words: str):
    if not self.accept(*words):
      self.fail(repr(" ".join(words)))

  def one_of(self, words: tuple[str, ...], what: str) -> int:
    for k, word in enumerate(words):
      if self.accept(word):
        return k
    self.fail(what)

  def name(self, table) -> int:
    for tokens, class_id in table:
      if self.accept(*tokens):
        return class_id
    self.fail("an item name")

  def noun_phrase(self) -> int:
    self.one_of(("a", "an"), "'a' or 'an'")
    self.single |= self.accept("single")
    return self.name(_CLASS_TOKENS)

  def position(self) -> int:
    if self.accept("in") or self.accept("at"):
      self.expect("the")
    row = self.one_of(_ROW_WORDS, "'top' or 'bottom'")
    col = self.one_of(_COL_WORDS, "'left' or 'right'")
    self.accept("corner")
    return _CELL_AT[(row, col)]

  def line(self) -> tuple[int, int]:
    """A row or column phrase -> its (left, right) or (top, bottom) cells."""
    if self.accept("on", "top"):
      return _ROWS[0]
    if self.accept("on", "the", "bottom"):
      return _ROWS[1]
    if self.accept("on", "the"):
      col = self.one_of(_COL_WORDS, "'left' or 'right'")
      self.accept("side")
      return _COLUMNS[col]
    if self.accept("at", "the"):
      return _ROWS[self.one_of(_ROW_WORDS, "'top' or 'bottom'")]
    self.expect("in", "the")
    if self.tokens[self.pos:self.pos + 1] and self.tokens[self.pos] in _ROW_WORDS:
      row = self.one_of(_ROW_WORDS, "'top' or 'bottom'")
      self.expect("row")
      return _ROWS[row]
    col = self.one_of(_COL_WORDS, "'left' or 'right'")
    self.expect("column")
    return _COLUMNS[col]

  def anchored(self, lines: tuple, what: str) -> tuple[int, int]:
    start = self.pos
    cells = self.line()
    if cells not in lines:
      self.pos = start
      self.fail(what)
    return cells

  def clause(self) -> list[tuple[int, int]]:
    """One clause -> [(cell, class id), ...]."""
    if self.accept("two"):
      class_id = self.name(_PLURAL_TOKENS)
      return [(c, class_id) for c in self.line()]
    first = self.noun_phrase()
    if self.accept("above") or self.accept("below"):
      first_on_top = self.tokens[self.pos - 1] == "above"
      second = self.noun_phrase()
      top, bottom = self.anchored(_COLUMNS, "a column ('on the left', 'in the right column')")
      return [(top, first), (bottom, second)] if first_on_top else [(top, second),
                                                                    (bottom, first)]
    if self.accept("with"):
      second = self.noun_phrase()
      if self.accept("below", "it") or self.accept("above", "it"):
        second_below = self.tokens[self.pos - 2] == "below"
        top, bottom = self.anchored(_COLUMNS, "a column ('on the left', 'in the right column')")
        return [(top, first), (bottom, second)] if second_below else [(top, second),
                                                                      (bottom, first)]
      self.expect("to", "its")
      second_right = self.one_of(_COL_WORDS, "'left' or 'right'") == 1
      left, right = self.anchored(_ROWS, "a row ('on top', 'in the bottom row')")
      return [(left, first), (right, second)] if second_right else [(left, second),
                                                                    (right, first)]
    if self.tokens[self.pos:self.pos + 1] in (["left"], ["right"], ["to"]):
      if self.accept("to"):
        self.expect("the")
      first_left = self.one_of(_COL_WORDS, "'left' or 'right'") == 0
      self.expect("of")
      second = self.noun_phrase()
      left, right = self.anchored(_ROWS, "a row ('on top', 'in the bottom row')")
      return [(left, first), (right, second)] if first_left else [(left, second),
                                                                  (right, first)]
    return [(self.position(), first)]

  def caption(self) -> np.ndarray:
    count = None
    only = self.accept("only") or self.accept("just")
    if not only:
      if self.accept("there"):
        self.one_of(("is", "are"), "'is' or 'are'")
      number, noun = (self.tokens[self.pos:self.pos + 2] + ["", ""])[:2]
      if number in _NUMBER_WORDS and noun in ("item", "items"):
        count = _NUMBER_WORDS.index(number) + 1
        self.pos += 2
        self.expect(":")
    layout = np.full(NUM_CELLS, EMPTY, np.int8)
    while True:
      for cell, class_id in self.clause():
        if layout[cell] != EMPTY:
          raise CaptionParseError(f"caption {self.text!r}: describes the "
                                  f"{_ROW_WORDS[_ROW_OF[cell]]} {_COL_WORDS[_COL_OF[cell]]} "
                                  "cell twice")
        layout[cell] = class_id
      if self.pos == len(self.tokens):
        break
      if not (self.accept(",") | self.accept("and")):
        self.fail("',' or 'and' between clauses, or the end")
    items = int(np.sum(layout != EMPTY))
    if count is not None and count != items:
      raise CaptionParseError(f"caption {self.text!r}: announces {count} items but describes "
                              f"{items}")
    if (only or self.single) and items != 1:
      raise CaptionParseError(f"caption {self.text!r}: says 'only'/'single' but describes "
                              f"{items} items")
    return layout


def parse_caption(text: str) -> np.ndarray:
  """The layout int8 [4] (TL, TR, BL, BR; -1 empty) a caption describes; unmentioned cells are
  empty. Raises CaptionParseError for text outside the grammar or contradicting itself.

  Grammar: [("there is|are")? NUMBER "item(s)" ":" | "only" | "just"] CLAUSE {("," | "and") CLAUSE}
  CLAUSE: NP POSITION | "two" PLURAL LINE | NP ("above" | "below") NP COLUMN
        | NP "with" NP ("below" | "above") "it" COLUMN | NP "with" NP "to its" SIDE ROW
        | NP ["to the"] SIDE "of" NP ROW;  NP: ("a" | "an") ["single"] NAME."""
  return _Parser(text).caption()


# --------------------------------------------------------------------------------------------
# Layout space and groups.


def _all_layouts() -> np.ndarray:
  """Every layout, int8 [11^4, 4]; row k encodes k in base 11 with digit = class id + 1."""
  digits = np.array(list(itertools.product(range(NUM_CLASSES + 1), repeat=NUM_CELLS)))
  return (digits - 1).astype(np.int8)


def _layout_index(layouts: np.ndarray) -> np.ndarray:
  """Inverse of _all_layouts: int8 [..., 4] -> int64 [...]."""
  weights = (NUM_CLASSES + 1) ** np.arange(NUM_CELLS - 1, -1, -1)
  return (layouts.astype(np.int64) + 1) @ weights


@dataclasses.dataclass(frozen=True)
class _LayoutSpace:
  layouts: np.ndarray  # int8 [L, 4]
  usable: np.ndarray  # bool [L]: at least one item, not four identical items
  multiset: np.ndarray  # int [L]: id of the layout's multiset of cell contents
  item_swaps: np.ndarray  # int [L, 6]: layout with two differing filled cells exchanged, or -1


def _layout_space() -> _LayoutSpace:
  layouts = _all_layouts()
  items = np.sum(layouts != EMPTY, axis=1)
  uniform = np.all(layouts == layouts[:, :1], axis=1)
  _, multiset = np.unique(np.sort(layouts, axis=1), axis=0, return_inverse=True)
  swaps = np.full((len(layouts), len(_CELL_PAIRS)), -1, np.int64)
  for k, (i, j) in enumerate(_CELL_PAIRS):
    valid = (layouts[:, i] != EMPTY) & (layouts[:, j] != EMPTY) & (layouts[:, i] != layouts[:, j])
    swapped = layouts.copy()
    swapped[:, [i, j]] = layouts[:, [j, i]]
    swaps[valid, k] = _layout_index(swapped[valid])
  return _LayoutSpace(layouts, (items > 0) & ~uniform, multiset.reshape(-1), swaps)


def _sample_groups(space: _LayoutSpace, rng: np.random.Generator, num_groups: int,
                   group_size: int, swap_fraction: float, split: str) -> tuple[np.ndarray,
                                                                                np.ndarray]:
  """Groups of distinct unused layouts: swap groups first (the more constrained kind), then
  look-alike groups. Returns layout indices int [G, group_size] and is_swap bool [G], with the
  groups and the members within each group in random order."""
  available = space.usable.copy()
  num_swap = int(round(swap_fraction * num_groups))
  groups = []
  for g in range(num_groups):
    if g < num_swap:  # a base layout and group_size - 1 single item swaps of it
      neighbours = space.item_swaps
      free = (neighbours >= 0) & available[np.maximum(neighbours, 0)]
      bases = np.flatnonzero(available & (free.sum(axis=1) >= group_size - 1))
      if not len(bases):
        raise ValueError(f"{split}: ran out of unused layouts for swap groups of "
                         f"{group_size} after {g} groups; lower num_{split} or swap_fraction")
      base = bases[rng.integers(len(bases))]
      options = neighbours[base][free[base]]
      members = np.concatenate([[base], rng.choice(options, group_size - 1, replace=False)
                               ]).astype(np.int64)
    else:  # group_size distinct arrangements of one multiset of items
      counts = np.bincount(space.multiset[available], minlength=space.multiset.max() + 1)
      multisets = np.flatnonzero(counts >= group_size)
      if not len(multisets):
        raise ValueError(f"{split}: ran out of unused layouts for look-alike groups of "
                         f"{group_size} after {g} groups; lower num_{split}")
      weights = counts[multisets] / counts[multisets].sum()
      chosen = multisets[rng.choice(len(multisets), p=weights)]
      options = np.flatnonzero(available & (space.multiset == chosen))
      members = rng.choice(options, group_size, replace=False)
    available[members] = False
    groups.append(rng.permutation(members))
  order = rng.permutation(num_groups)
  is_swap = np.arange(num_groups) < num_swap
  return np.asarray(groups, np.int64).reshape(num_groups, group_size)[order], is_swap[order]


# --------------------------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass(frozen=True)
class CompositionalSplit:
  """One split, examples ordered group by group.

  images uint8 [N, 56, 56]; layouts int8 [N, 4] (TL, TR, BL, BR; -1 empty); captions N lists
  of 5 strings; image_ids int32 [N] (unique across splits); group_ids int32 [N] (unique across
  splits); is_swap_group bool [N] (the example's group is a swap group, else look-alike);
  source_indices int32 [N, 4] (per cell, the index of its Fashion-MNIST image, -1 empty:
  into train_images for "train", into test_images for "val" and "test"); probe_true [N] (the
  first caption) and probe_false [N] (the same wording on a layout with two cells swapped)."""
  images: np.ndarray
  layouts: np.ndarray
  captions: list[list[str]]
  image_ids: np.ndarray
  group_ids: np.ndarray
  is_swap_group: np.ndarray
  source_indices: np.ndarray
  probe_true: list[str]
  probe_false: list[str]


def _draw_sources(layouts: np.ndarray, pools: list[np.ndarray], next_free: np.ndarray,
                  split: str) -> np.ndarray:
  """Source image per filled cell, without replacement from per-class pools (advancing
  next_free in place). Returns int32 [N, 4], -1 for empty cells."""
  sources = np.full(layouts.shape, EMPTY, np.int32)
  for class_id, pool in enumerate(pools):
    where = layouts == class_id
    need = int(where.sum())
    if next_free[class_id] + need > len(pool):
      raise ValueError(f"{split}: needs more '{CLASS_NAMES[class_id]}' source images than are "
                       f"left ({len(pool) - next_free[class_id]}); lower num_{split}")
    sources[where] = pool[next_free[class_id]:next_free[class_id] + need]
    next_free[class_id] += need
  return sources


def _compose_images(sources: np.ndarray, layouts: np.ndarray, items: np.ndarray) -> np.ndarray:
  """uint8 [N, 56, 56] grids with items[sources[n, c]] in cell c (black where empty)."""
  images = np.zeros((len(layouts), GRID_SIZE, GRID_SIZE), np.uint8)
  for cell in range(NUM_CELLS):
    top, left = IMAGE_SIZE * _ROW_OF[cell], IMAGE_SIZE * _COL_OF[cell]
    filled = layouts[:, cell] != EMPTY
    images[filled, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE] = items[sources[filled, cell]]
  return images


def _build_split(split: str, num: int, space: _LayoutSpace, rng: np.random.Generator,
                 pools: list[np.ndarray], next_free: np.ndarray, items: np.ndarray,
                 group_size: int, swap_fraction: float) -> CompositionalSplit:
  groups, group_is_swap = _sample_groups(space, rng, num // group_size, group_size,
                                         swap_fraction, split)
  layouts = space.layouts[groups.reshape(-1)]
  captions, probe_false = [], []
  for layout in layouts:
    texts, false = _captions_and_probe(layout, rng, CAPTIONS_PER_IMAGE)
    captions.append(texts)
    probe_false.append(false)
  sources = _draw_sources(layouts, pools, next_free, split)
  result = CompositionalSplit(
      images=_compose_images(sources, layouts, items),
      layouts=layouts,
      captions=captions,
      image_ids=(SPLIT_ID_OFFSETS[split] + np.arange(num)).astype(np.int32),
      group_ids=(SPLIT_ID_OFFSETS[split] + np.arange(num) // group_size).astype(np.int32),
      is_swap_group=np.repeat(group_is_swap, group_size),
      source_indices=sources,
      probe_true=[texts[0] for texts in captions],
      probe_false=probe_false)
  _check_split(split, result)
  return result


def _check_split(split: str, data: CompositionalSplit) -> None:
  """Raises if a caption is not exactly true of its image, a layout repeats, or a probe false
  caption is not a same-items rearrangement."""
  n = len(data.layouts)
  chex.assert_shape(data.images, (n, GRID_SIZE, GRID_SIZE))
  chex.assert_shape([data.image_ids, data.group_ids, data.is_swap_group], (n,))
  if len(np.unique(_layout_index(data.layouts))) != n:
    raise AssertionError(f"{split}: layouts repeat within the split")
  for layout, texts, false in zip(data.layouts, data.captions, data.probe_false):
    if len(set(texts)) != CAPTIONS_PER_IMAGE:
      raise AssertionError(f"{split}: captions of layout {layout.tolist()} repeat: {texts}")
    for text in texts:
      if not np.array_equal(parse_caption(text), layout):
        raise AssertionError(f"{split}: caption {text!r} does not describe {layout.tolist()}")
    false_layout = parse_caption(false)
    if np.array_equal(false_layout, layout) or \
       not np.array_equal(np.sort(false_layout), np.sort(layout)):
      raise AssertionError(f"{split}: probe caption {false!r} is not a rearrangement of "
                           f"{layout.tolist()}")


def build_benchmark(fmnist: FashionMnist, *, seed: int, num_train: int, num_val: int,
                    num_test: int, group_size: int = 4,
                    swap_fraction: float = 0.5) -> dict[str, CompositionalSplit]:
  """Generates {"train", "val", "test"} deterministically from `seed`.

  Train items come from fmnist's train images, val and test items from its test images; no
  source image is used twice (within or across splits). Each split is num_* // group_size groups
  (num_* must be a multiple of group_size), round(swap_fraction * groups) of them swap groups."""
  sizes = {"train": num_train, "val": num_val, "test": num_test}
  for split, num in sizes.items():
    if num <= 0 or num % group_size:
      raise ValueError(f"num_{split}={num} must be a positive multiple of group_size="
                       f"{group_size} (splits are made of whole groups); change one of them")
  if not 0.0 <= swap_fraction <= 1.0:
    raise ValueError(f"swap_fraction={swap_fraction} must lie in [0, 1]")
  max_group = 1 + len(_CELL_PAIRS) if swap_fraction > 0 else 24
  if not 1 <= group_size <= max_group:
    raise ValueError(f"group_size={group_size} must lie in [1, {max_group}] (a layout has at "
                     f"most {len(_CELL_PAIRS)} item swaps and 24 arrangements); lower it")
  space = _layout_space()
  pool_rng, *split_rngs = [np.random.default_rng(s)
                           for s in np.random.SeedSequence(seed).spawn(1 + len(SPLITS))]

  def class_pools(labels: np.ndarray) -> list[np.ndarray]:
    return [pool_rng.permutation(np.flatnonzero(labels == k)).astype(np.int32)
            for k in range(NUM_CLASSES)]

  train_pools, test_pools = class_pools(fmnist.train_labels), class_pools(fmnist.test_labels)
  train_next, test_next = np.zeros(NUM_CLASSES, np.int64), np.zeros(NUM_CLASSES, np.int64)
  sources = {"train": (train_pools, train_next, fmnist.train_images),
             "val": (test_pools, test_next, fmnist.test_images),
             "test": (test_pools, test_next, fmnist.test_images)}
  return {split: _build_split(split, sizes[split], space, rng, *sources[split], group_size,
                              swap_fraction)
          for split, rng in zip(SPLITS, split_rngs)}


def normalize_images(images: np.ndarray) -> np.ndarray:
  """uint8 [B, 56, 56] -> float32 [B, 56, 56, 1], (x / 255 - IMAGE_MEAN) / IMAGE_STD."""
  chex.assert_rank(images, 3)
  scaled = images.astype(np.float32) / np.float32(255.0)
  return ((scaled - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD))[..., None]
