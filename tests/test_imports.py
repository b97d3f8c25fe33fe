"""The import graph points one way: no cycle between modules, convert/ builds on esd_jax and is never imported by
what it builds on, and the ESD core does not import the shapes world (the built-in demo model).

Every import counts, at module level or inside a function: a lazy import is still an arrow. Layers, bottom up:
esd_jax's library (models, files, esd, train's parts, …) → convert/ → esd_jax.loading, esd_jax.train,
esd_jax.shapes_world → esd_jax.commands → esd_jax.app (the web app) → main.py.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
  found = {'main': ROOT / 'main.py'}
  for package in ('esd_jax', 'convert'):
    for path in (ROOT / package).rglob('*.py'):
      parts = path.relative_to(ROOT).with_suffix('').parts
      found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return found


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
  """The project modules `path` imports: `from a.b import c` is a.b.c where that is a module, else a.b."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
      targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base for alias in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:
        target = target.rpartition('.')[0]
      if target and target != name:
        out.add(target)
  return out


MODULES = _modules()
GRAPH = {name: _imports(path, name, set(MODULES)) for name, path in MODULES.items()}


def _reachable(start: set[str]) -> set[str]:
  seen, todo = set(), list(start)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(GRAPH[name])
  return seen


def test_the_graph_sees_the_known_arrows():
  # The parser finds lazy imports (inside functions) and `from package import module`.
  assert 'convert.erased' in GRAPH['esd_jax.commands'] and 'esd_jax.train' in GRAPH['esd_jax.commands']
  assert 'esd_jax.files' in GRAPH['convert.diffusers_format']
  assert 'esd_jax.models.unet' in GRAPH['esd_jax.models']
  assert len(MODULES) > 40


def test_no_import_cycle():
  cycles = [f'{a} → … → {a}' for a in GRAPH if a in _reachable(GRAPH[a])]
  assert not cycles, cycles


def test_what_convert_builds_on_never_imports_convert():
  convert = {m for m in MODULES if m == 'convert' or m.startswith('convert.')}
  below = _reachable(set().union(*(GRAPH[m] for m in convert))) - convert
  back = {m: sorted(GRAPH[m] & convert) for m in below if GRAPH[m] & convert}
  assert below and not back, back


def test_the_esd_core_does_not_import_the_shapes_world():
  demo = {m for m in MODULES if m.startswith('esd_jax.shapes_world')}
  # The command layer (commands, its config checks), the web app above it and model resolution name the built-in
  # model; nothing below.
  above = {'main', 'esd_jax.commands', 'esd_jax.validate', 'esd_jax.loading'} | {
      m for m in MODULES if m.startswith('esd_jax.app')}
  core = {m for m in MODULES if m.startswith('esd_jax') and m not in demo | above}
  leaks = {m: sorted(GRAPH[m] & demo) for m in core if GRAPH[m] & demo}
  assert not leaks, leaks
