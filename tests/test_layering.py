"""Import layering of the package, read from the `layers` block in docs/architecture.md.

Pure `ast`: nothing of jaxdistill is imported. Every import in every file under jaxdistill/ counts,
at module level or inside a function, under `if TYPE_CHECKING:` or not; module paths written as
strings for a lazy `importlib.import_module` ("jaxdistill.train.loop:run", f"jaxdistill.methods.{x}")
count too. A unit is a subpackage (`models`) or a top-level module (`errors` for errors.py). The
checker fails on an import to a higher layer, on a cycle between units, on a unit the block does
not name and on a name in the block that is not a unit.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO / "jaxdistill"
ARCHITECTURE_MD = REPO / "docs" / "architecture.md"

_FENCE = re.compile(r"^```(\S*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# "jaxdistill.train.loop" or "jaxdistill.train.loop:train_and_evaluate" as a whole string.
_MODULE_STRING = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")
# The literal head of f"jaxdistill.methods.{name}" or f"jaxdistill.train.loop:{function}".
_MODULE_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)[.:]$")


# --------------------------------------------------------------------------------------- the doc


def parse_layers(markdown: str) -> list[list[str]]:
  """The units of each layer, low to high, from the one ```layers block under "## Layers"."""
  section = re.search(r"^## Layers[ \t]*\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
  if section is None:
    raise ValueError('docs/architecture.md has no "## Layers" section')
  blocks = [body for tag, body in _FENCE.findall(section.group(1)) if tag == "layers"]
  if len(blocks) != 1:
    raise ValueError(f'"## Layers" must hold exactly one ```layers block, found {len(blocks)}')
  layers, seen = [], {}
  for number, line in enumerate(l for l in blocks[0].splitlines() if l.strip()):
    units = [u.strip() for u in line.split(",")]
    for unit in units:
      if not unit.isidentifier():
        raise ValueError(f"```layers line {line.strip()!r}: {unit!r} is not a unit name")
      if unit in seen:
        raise ValueError(f"```layers names {unit!r} twice (layers {seen[unit]} and {number})")
      seen[unit] = number
    layers.append(units)
  if not layers:
    raise ValueError("the ```layers block is empty")
  return layers


# ---------------------------------------------------------------------------------- the imports


@dataclasses.dataclass(frozen=True, order=True)
class Import:
  file: str        # relative to the package's parent, e.g. "jaxdistill/config.py"
  line: int
  source: str      # importing unit, "" for the package's own __init__.py
  target: str      # imported unit
  via_string: bool = False

  def where(self) -> str:
    return f"{self.file}:{self.line}"


def package_units(package_dir: Path) -> set[str]:
  """Subpackages (directories holding .py files) and top-level modules, but not __init__."""
  units = set()
  for child in package_dir.iterdir():
    if child.name.startswith((".", "__")):
      continue
    if child.is_dir() and any(_python_files(child)):
      units.add(child.name)
    elif child.suffix == ".py":
      units.add(child.stem)
  return units


def _python_files(root: Path):
  for path in sorted(root.rglob("*.py")):
    if not any(part == "__pycache__" or part.startswith(".") for part in path.relative_to(root).parts):
      yield path


def _imported_modules(tree: ast.AST, module_parts: list[str], is_init: bool):
  """(line, dotted module name, via_string) for every import anywhere in `tree`."""
  package = module_parts if is_init else module_parts[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, False
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join(base)
        module = f"{base}.{node.module}" if node.module else base
      else:
        module = node.module or ""
      yield node.lineno, module, False
      for alias in node.names:        # `from pkg import sub`: sub may be a module
        if alias.name != "*":
          yield node.lineno, f"{module}.{alias.name}", False
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      if _MODULE_STRING.match(node.value):
        yield node.lineno, node.value.partition(":")[0], True
    elif isinstance(node, ast.JoinedStr) and node.values:
      # f"jaxdistill.methods.{name}" or f"jaxdistill.train.loop:{function}"
      head = node.values[0]
      if isinstance(head, ast.Constant) and isinstance(head.value, str):
        match = _MODULE_PREFIX.match(head.value)
        if match:
          yield node.lineno, match.group(1), True


def collect_imports(package_dir: Path) -> list[Import]:
  """Every import of one of the package's units by a file of the package, self-imports included."""
  package_dir = Path(package_dir)
  package = package_dir.name
  units = package_units(package_dir)
  found = set()
  for path in _python_files(package_dir):
    relative = path.relative_to(package_dir)
    parts = [package, *relative.with_suffix("").parts]
    is_init = parts[-1] == "__init__"
    if is_init:
      parts = parts[:-1]
    source = parts[1] if len(parts) > 1 else ""
    file = path.relative_to(package_dir.parent).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for line, module, via_string in _imported_modules(tree, parts, is_init):
      names = module.split(".")
      if len(names) < 2 or names[0] != package:
        continue
      target = names[1]
      if target not in units:
        # `from jaxdistill import __version__`; the unit-less second name of the
        # `from jaxdistill.x import y` pair is dropped here too, the first one counts x
        continue
      found.add(Import(file, line, source, target, via_string))
  # `from jaxdistill.x import y` yields both "jaxdistill.x" and "jaxdistill.x.y": same unit, one Import.
  return sorted(found)


# --------------------------------------------------------------------------------- the checker


@dataclasses.dataclass
class Report:
  upward: list[str] = dataclasses.field(default_factory=list)
  cycles: list[str] = dataclasses.field(default_factory=list)
  undocumented: list[str] = dataclasses.field(default_factory=list)   # in the code, not the doc
  stale: list[str] = dataclasses.field(default_factory=list)          # in the doc, not the code
  root: list[str] = dataclasses.field(default_factory=list)           # the package's __init__.py

  def __bool__(self) -> bool:
    return any((self.upward, self.cycles, self.undocumented, self.stale, self.root))

  def text(self) -> str:
    sections = [
        ("units missing from the ```layers block in docs/architecture.md", self.undocumented),
        ("names in the ```layers block that are not units of the package", self.stale),
        ("imports from a lower layer to a higher one", self.upward),
        ("import cycles between units", self.cycles),
        ("imports in the package's __init__.py (it runs before every unit)", self.root),
    ]
    out = []
    for title, lines in sections:
      if lines:
        out.append(f"{title} ({len(lines)}):")
        out.extend(f"  {line}" for line in lines)
    return "\n".join(out)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm; components in no particular order, each sorted."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def check_layering(package_dir: Path, layers: list[list[str]]) -> Report:
  """Check every import of the package in `package_dir` against `layers` (low to high)."""
  package_dir = Path(package_dir)
  layer_of = {unit: number for number, units in enumerate(layers) for unit in units}
  units = package_units(package_dir)
  imports = collect_imports(package_dir)
  report = Report()
  report.undocumented = sorted(units - set(layer_of))
  report.stale = sorted(set(layer_of) - units)

  def describe(imp: Import) -> str:
    def unit(name):
      return f"{name} (layer {layer_of[name]})" if name in layer_of else f"{name} (no layer)"
    note = "  [module path in a string]" if imp.via_string else ""
    return f"{imp.where()} {unit(imp.source)} -> {unit(imp.target)}{note}"

  graph: dict[str, set[str]] = {}
  for imp in imports:
    if not imp.source:
      report.root.append(f"{imp.where()} -> {imp.target}")
      continue
    if imp.source == imp.target:
      continue
    graph.setdefault(imp.source, set()).add(imp.target)
    if imp.source in layer_of and imp.target in layer_of and layer_of[imp.target] > layer_of[imp.source]:
      report.upward.append(describe(imp))

  for component in _strongly_connected(graph):
    if len(component) > 1:
      members = set(component)
      report.cycles.append("cycle: " + " <-> ".join(component))
      report.cycles.extend(
          "  " + describe(imp) for imp in imports
          if imp.source in members and imp.target in members and imp.source != imp.target)
  return report


# ----------------------------------------------------------------------------- the real package


def _doc_layers() -> list[list[str]]:
  return parse_layers(ARCHITECTURE_MD.read_text(encoding="utf-8"))


def test_architecture_doc_has_a_layers_block():
  layers = _doc_layers()
  assert len(layers) >= 2 and all(layers)


def test_package_layering_matches_architecture_doc():
  report = check_layering(PACKAGE_DIR, _doc_layers())
  assert not report, "\n" + report.text()


# --------------------------------------------------------- self-tests of the checker (fake package)


LAYERS = [["errors", "atomic", "config"], ["models", "losses"], ["train"], ["main"]]


def _write(root: Path, files: dict[str, str]) -> Path:
  package = root / "fakepkg"
  for name, text in {"__init__.py": "", **files}.items():
    path = package / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return package


def _clean_package(tmp_path: Path) -> Path:
  return _write(tmp_path, {
      "errors.py": "class E(Exception):\n  pass\n",
      "atomic.py": "import os\n",                                     # imported by no unit
      "config.py": "from fakepkg.errors import E\n",
      "models/__init__.py": "",
      "models/dual.py": "import fakepkg.errors\nfrom fakepkg import config\nfrom . import layers\n",
      "models/layers.py": "from .dual import x\n",
      "losses/__init__.py": "from fakepkg.models import dual\n",   # same layer, no cycle
      "train/__init__.py": "",
      "train/loop.py": "def f():\n  from ..losses import thing\n  import fakepkg.models.dual as d\n",
      "main.py": 'MODES = {"train": "fakepkg.train.loop:run"}\n',
  })


def test_checker_passes_a_clean_package(tmp_path):
  report = check_layering(_clean_package(tmp_path), LAYERS)
  assert not report, report.text()


def test_checker_sees_every_import_form(tmp_path):
  package = _clean_package(tmp_path)
  edges = {(i.file, i.line, i.source, i.target) for i in collect_imports(package)}
  assert edges >= {
      ("fakepkg/config.py", 1, "config", "errors"),
      ("fakepkg/models/dual.py", 1, "models", "errors"),          # import fakepkg.x
      ("fakepkg/models/dual.py", 2, "models", "config"),          # from fakepkg import x
      ("fakepkg/models/dual.py", 3, "models", "models"),          # from . import x
      ("fakepkg/train/loop.py", 2, "train", "losses"),            # relative, inside a function
      ("fakepkg/train/loop.py", 3, "train", "models"),            # import ... as, inside a function
      ("fakepkg/main.py", 1, "main", "train"),                    # "module:function" string
  }


def test_checker_flags_an_upward_import(tmp_path):
  package = _clean_package(tmp_path)
  (package / "atomic.py").write_text(
      "from typing import TYPE_CHECKING\n"
      "if TYPE_CHECKING:\n"
      "  from fakepkg.models import dual\n"
      "def f():\n"
      "  import importlib\n"
      '  return importlib.import_module(f"fakepkg.train.{name}")\n')
  report = check_layering(package, LAYERS)
  assert report.upward == [
      "fakepkg/atomic.py:3 atomic (layer 0) -> models (layer 1)",
      "fakepkg/atomic.py:6 atomic (layer 0) -> train (layer 2)  [module path in a string]",
  ]
  assert not report.cycles and not report.undocumented and not report.stale
  assert "imports from a lower layer to a higher one (2):" in report.text()


def test_checker_flags_a_cycle_within_a_layer(tmp_path):
  package = _clean_package(tmp_path)
  (package / "models" / "layers.py").write_text("x = 1\n\n\ndef f():\n  from fakepkg.losses import y\n")
  report = check_layering(package, LAYERS)
  assert report.upward == []          # models and losses share a layer: only the cycle is wrong
  assert report.cycles == [
      "cycle: losses <-> models",
      "  fakepkg/losses/__init__.py:1 losses (layer 1) -> models (layer 1)",
      "  fakepkg/models/layers.py:5 models (layer 1) -> losses (layer 1)",
  ]


def test_checker_flags_a_cycle_across_layers_as_both(tmp_path):
  package = _clean_package(tmp_path)
  (package / "errors.py").write_text("from fakepkg import main\n")
  report = check_layering(package, LAYERS)
  assert report.upward == ["fakepkg/errors.py:1 errors (layer 0) -> main (layer 3)"]
  assert report.cycles[0] == "cycle: config <-> errors <-> losses <-> main <-> models <-> train"
  assert "  fakepkg/errors.py:1 errors (layer 0) -> main (layer 3)" in report.cycles


def test_checker_flags_a_unit_missing_from_the_doc_and_a_stale_name(tmp_path):
  package = _clean_package(tmp_path)
  (package / "store").mkdir()
  (package / "store" / "__init__.py").write_text("from fakepkg import train\n")
  report = check_layering(package, LAYERS + [["plot"]])
  assert report.undocumented == ["store"]
  assert report.stale == ["plot"]
  assert report.upward == []          # store has no layer: reported as undocumented only
  assert "units missing from the ```layers block" in report.text()


def test_checker_flags_imports_in_the_package_init(tmp_path):
  package = _clean_package(tmp_path)
  (package / "__init__.py").write_text("from fakepkg.train import loop\n")
  assert check_layering(package, LAYERS).root == ["fakepkg/__init__.py:1 -> train"]


def test_parse_layers():
  doc = ("# T\n\n## Layers\n\nText.\n\n```layers\na, b\n\nc\n```\n\n## Next\n\n"
         "```layers\nignored\n```\n")
  assert parse_layers(doc) == [["a", "b"], ["c"]]
  with pytest.raises(ValueError, match="no \"## Layers\""):
    parse_layers("# T\n")
  with pytest.raises(ValueError, match="exactly one"):
    parse_layers("## Layers\n\n```text\na\n```\n")
  with pytest.raises(ValueError, match="twice"):
    parse_layers("## Layers\n\n```layers\na, b\nb\n```\n")
  with pytest.raises(ValueError, match="not a unit name"):
    parse_layers("## Layers\n\n```layers\na b\n```\n")
