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
A file is UTF-8 text (a byte-order mark, as spreadsheets write, is fine). A prompt (concept, erase_from) is
one line: a CSV value may be quoted (to hold a comma), but a line break inside a prompt is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from pathlib import Path

import ml_collections

from esd_jax.files import parse_json

FIELDS = ('concept', 'erase_from', 'negative_guidance', 'learning_rate', 'iterations')
_LINE_BREAK = re.compile(r'\r\n|\r|\n')  # the line ends of io's universal newlines, by which csv counts lines


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
  prompt = _prompt(entry, 'concept', where)
  if not prompt:
    raise ConceptError(f'{where}: the concept is empty; every entry needs a non-empty "concept".')
  eta = _number(entry, 'negative_guidance', where, float, nonnegative=True)  # η < 0 trains toward the concept
  learning_rate = _number(entry, 'learning_rate', where, float, positive=True)
  iterations = _number(entry, 'iterations', where, int, positive=True)
  erase_from = _prompt(entry, 'erase_from', where)
  return Concept(prompt, '' if erase_from == prompt else erase_from, eta, learning_rate, iterations)


def _prompt(entry: dict, field: str, where: str) -> str:
  """entry[field] as a one-line prompt, stripped ('' when absent or empty)."""
  prompt = str(entry.get(field) or '').strip()
  if '\n' in prompt or '\r' in prompt:
    raise ConceptError(f'{where}: {field} {prompt!r} holds a line break, but a prompt is one line; remove the '
                       'line break (in a CSV file, inside the quotes).')
  return prompt


def _number(entry: dict, field: str, where: str, kind: type, *, positive: bool = False, nonnegative: bool = False):
  """entry[field] as a finite `kind` (above zero if `positive`, ≥ 0 if `nonnegative`), None when absent or empty."""
  value = entry.get(field)
  if value in (None, ''):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not (math.isfinite(number) and (number > 0 or not positive) and (number >= 0 or not nonnegative)
          and (kind is float or number.is_integer())):
    what = (('a positive ' if positive else 'a finite ') + ('whole number' if kind is int else 'number')
            + (' ≥ 0' if nonnegative else ''))
    raise ConceptError(f'{where}: {field} {value!r} is not {what}.')
  return kind(number)


def read_concepts(path: str | Path) -> list[Concept]:
  """The concepts listed in a file (see the module docstring for the formats)."""
  path = Path(path)
  if not path.is_file():
    raise ConceptError(f'{path}: no such concepts file; pass --config.erase.concepts_file=PATH to an existing '
                       'text, CSV or JSON file.')
  text = _decode(path.read_bytes(), path)
  suffix = path.suffix.lower()
  if suffix == '.json':
    entries = parse_json(text, f'{path} (a list of concepts: strings or objects)', list, ConceptError)
    concepts = [_concept(e if isinstance(e, dict) else {'concept': e}, f'{path} entry {i}')
                for i, e in enumerate(entries)]
  elif suffix == '.csv':
    concepts = _read_csv(text, path)
  else:
    lines = [line.strip() for line in text.splitlines()]
    concepts = [Concept(line) for line in lines if line and not line.startswith('#')]
  if not concepts:
    raise ConceptError(f'{path}: lists no concepts.')
  return concepts


def _decode(data: bytes, path: Path) -> str:
  """The file's text: UTF-8, a leading byte-order mark dropped (as 'utf-8-sig' does, but with the offset of a bad
  byte counted from the file's start)."""
  try:
    return data.decode('utf-8').removeprefix('\ufeff')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise ConceptError(f'{path}: not UTF-8 text (byte offset {e.start}, line {line}: {data[e.start:e.start + 4]!r}); '
                       'save the file as UTF-8 (e.g. "CSV UTF-8" in a spreadsheet, or UTF-8 in an editor).') from e


def _read_csv(text: str, path: Path) -> list[Concept]:
  """The rows of a CSV concepts file, each named by its line (a quoted value may span lines: by its lines)."""
  reader = csv.DictReader(io.StringIO(text, newline=''))
  try:
    fieldnames = reader.fieldnames
    if not fieldnames or 'concept' not in fieldnames:
      raise ConceptError(f'{path}: a CSV concepts file needs a header row with a "concept" column '
                         f'(optional: {", ".join(FIELDS[1:])}); found {fieldnames}.')
    concepts = []
    for row in reader:
      # The row's last line; blank lines before it were skipped, so its first is found by counting back the
      # line breaks inside its values (those past the header's columns are under the key None).
      end = reader.line_num
      values = [v for k, v in row.items() if k is not None] + row.get(None, [])
      start = end - sum(len(_LINE_BREAK.findall(v)) for v in values if v)
      where = f'{path} line {end}' if start == end else f'{path} lines {start}-{end}'
      if None in row:
        raise ConceptError(f'{where}: {len(row[None])} more value(s) than the header has columns ({fieldnames}); '
                           'quote a value that holds a comma.')
      concepts.append(_concept(row, where))
  except csv.Error as e:
    raise ConceptError(f'{path} line {reader.line_num}: not valid CSV ({e}).') from e
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
