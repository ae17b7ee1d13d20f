"""Several named teachers used at once, e.g. MCAD's dual + cross teachers (paper 001 §3.2:
the dual teacher's similarities and the cross teacher's matching scores are fused into one
target) or a LoopITR run serving as both."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

from jaxdistill.teachers.base import Teacher


@dataclasses.dataclass(frozen=True)
class MultiTeacher:
  """Named teachers, e.g. MultiTeacher({"dual": t1, "cross": t2}).

  `params` is the {name: params} pytree to pass into a jitted step (so the teachers' params are
  arguments, not constants folded into the compiled program); `teacher[name]` gives one Teacher."""
  teachers: Mapping[str, Teacher]

  def __post_init__(self):
    if not self.teachers:
      raise ValueError("MultiTeacher needs at least one teacher, e.g. {'dual': ..., 'cross': ...}")
    for name, t in self.teachers.items():
      if not isinstance(t, Teacher):
        raise TypeError(f"MultiTeacher[{name!r}] is a {type(t).__name__}, not a Teacher")

  def __getitem__(self, name: str) -> Teacher:
    if name not in self.teachers:
      raise KeyError(f"no teacher named {name!r}: this MultiTeacher has {sorted(self.teachers)}")
    return self.teachers[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self.teachers)

  def __len__(self) -> int:
    return len(self.teachers)

  @property
  def params(self) -> dict[str, Any]:
    return {name: t.params for name, t in self.teachers.items()}

  @property
  def dual(self) -> Teacher:
    """The first teacher with dual towers (MCAD's dual teacher)."""
    return self._first("is_dual", "dual (embed_images + embed_texts)")

  @property
  def cross(self) -> Teacher:
    """The first teacher with match_scores (MCAD's / CPRD's cross teacher)."""
    return self._first("is_cross", "cross (match_scores)")

  def _first(self, attribute: str, what: str) -> Teacher:
    for t in self.teachers.values():
      if getattr(t, attribute):
        return t
    raise ValueError(f"none of the teachers {sorted(self.teachers)} is a {what} teacher")
