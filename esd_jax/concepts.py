"""The concepts of a run: from the config's lists, or from a concepts file.

A concepts file is one of
- text (any other extension): one concept a line; blank lines and lines starting with '#' are skipped;
- CSV with a header: a `concept` column, optional `erase_from`, `negative_guidance`, `learning_rate` and
  `iterations` columns;
- JSON: a list of strings, or of objects with `concept` and optional `erase_from`, `negative_guidance`,
  `learning_rate`, `iterations`.
An empty `erase_from` means none; an empty `negative_guidance`, `learning_rate` or `iterations` means the run's
(erase.negative_guidance, train.learning_rate, train.iterations). The last two belong to a model, so the lines
that train one model (all of them, or with erase.separate_models those of one concept) must agree on them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import ml_collections

FIELDS = ('concept', 'erase_from', 'negative_guidance', 'learning_rate', 'iterations')


class ConceptError(ValueError):
  """A concept list or file is unusable; the message names the entry and the fix."""


@dataclasses.dataclass(frozen=True)
class Concept:
  prompt: str
  erase_from: str = ''
  negative_guidance: float | None = None  # None: the run's
  learning_rate: float | None = None
  iterations: int | None = None


def _concept(entry: dict, where: str) -> Concept:
  unknown = sorted(set(entry) - set(FIELDS))
  if unknown:
    raise ConceptError(f'{where}: unknown field(s) {unknown}; a concept has {list(FIELDS)}.')
  prompt = str(entry.get('concept') or '').strip()
  if not prompt:
    raise ConceptError(f'{where}: the concept is empty; every entry needs a non-empty "concept".')
  eta = _number(entry, 'negative_guidance', where, float)
  learning_rate = _number(entry, 'learning_rate', where, float, positive=True)
  iterations = _number(entry, 'iterations', where, int, positive=True)
  erase_from = str(entry.get('erase_from') or '').strip()
  return Concept(prompt, '' if erase_from == prompt else erase_from, eta, learning_rate, iterations)


def _number(entry: dict, field: str, where: str, kind: type, *, positive: bool = False):
  """entry[field] as a finite `kind` (above zero if `positive`), None when absent or empty."""
  value = entry.get(field)
  if value in (None, ''):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not (math.isfinite(number) and (number > 0 or not positive) and (kind is float or number.is_integer())):
    what = ('a positive ' if positive else 'a finite ') + ('whole number' if kind is int else 'number')
    raise ConceptError(f'{where}: {field} {value!r} is not {what}.')
  return kind(number)


def read_concepts(path: str | Path) -> list[Concept]:
  """The concepts listed in a file (see the module docstring for the formats)."""
  path = Path(path)
  if not path.is_file():
    raise ConceptError(f'{path}: no such concepts file; pass --config.erase.concepts_file=PATH to an existing '
                       'text, CSV or JSON file.')
  text = path.read_text(encoding='utf-8')
  suffix = path.suffix.lower()
  if suffix == '.json':
    try:
      entries = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConceptError(f'{path}: not valid JSON ({e}); expected a list of strings or objects.') from e
    if not isinstance(entries, list):
      raise ConceptError(f'{path}: expected a JSON list of concepts, got {type(entries).__name__}.')
    concepts = [_concept(e if isinstance(e, dict) else {'concept': e}, f'{path} entry {i}')
                for i, e in enumerate(entries)]
  elif suffix == '.csv':
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or 'concept' not in reader.fieldnames:
      raise ConceptError(f'{path}: a CSV concepts file needs a header row with a "concept" column '
                         f'(optional: erase_from, negative_guidance); found {reader.fieldnames}.')
    concepts = [_concept(row, f'{path} line {i + 2}') for i, row in enumerate(reader)]
  else:
    lines = [line.strip() for line in text.splitlines()]
    concepts = [Concept(line) for line in lines if line and not line.startswith('#')]
  if not concepts:
    raise ConceptError(f'{path}: lists no concepts.')
  return concepts


def of_config(erase: ml_collections.ConfigDict) -> list[Concept]:
  """The run's concepts: erase.concepts_file if set, else erase.concepts with erase.erase_from."""
  if erase.concepts_file:
    return read_concepts(erase.concepts_file)
  prompts = [erase.concepts] if isinstance(erase.concepts, str) else list(erase.concepts)
  froms = [erase.erase_from] * len(prompts) if isinstance(erase.erase_from, str) else list(erase.erase_from)
  if len(froms) != len(prompts):
    raise ConceptError(f'erase.erase_from has {len(froms)} entries for {len(prompts)} concepts; give one per '
                       'concept, or a single string for all.')
  if not prompts or any(not str(p).strip() for p in prompts):
    raise ConceptError(f'erase.concepts = {erase.concepts!r}: every concept must be a non-empty prompt, e.g. '
                       "--config.erase.concepts=\"('Van Gogh',)\".")
  return [_concept({'concept': p, 'erase_from': f}, f'erase.concepts[{i}]')
          for i, (p, f) in enumerate(zip(prompts, froms))]


def by_prompt(concepts: list[Concept]) -> list[list[int]]:
  """Indices of the concepts grouped by prompt, in order of first appearance: with separate models, one
  model per distinct concept, erased from each of its lines' erase_from prompts (one drawn per iteration)."""
  groups: dict[str, list[int]] = {}
  for i, c in enumerate(concepts):
    groups.setdefault(c.prompt, []).append(i)
  return list(groups.values())
