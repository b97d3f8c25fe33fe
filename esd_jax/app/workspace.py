"""What the app keeps under config.workdir, read back from the files alone (a restarted server sees it all):

- runs/NAME/: one erasure per folder, an ordinary `erase` workdir (checkpoints/, metrics.jsonl, erased/,
  report.json) plus app_config.json, the config it was started with (what Resume runs again);
- imported/NAME/: ESD weights files brought in through the Models tab (the authors' .pt / .safetensors);
- downloads/: what the Models tab exported for download.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import ml_collections

from esd_jax import commands
from esd_jax.app import forms
from esd_jax.files import atomic_path, read_json, write_json

RUNS, IMPORTED, DOWNLOADS = 'runs', 'imported', 'downloads'
RUN_CONFIG = 'app_config.json'
TRAINED = 'unet_trained.safetensors'  # convert.erased.OUTPUTS['trained']: how the app finds a run's models


@dataclasses.dataclass(frozen=True)
class ErasedModel:
  """An erased model the Test and Models tabs offer: a run's (one of a separate-models run's), or imported."""

  name: str  # RUN, RUN/NNN-concept (separate models) or imported/NAME
  weights: Path  # its ESD weights: the run's trained-only file, or the imported file
  concepts: tuple[str, ...]
  report: Path | None = None  # the run's report.json (shapes world), where measured
  report_key: str = ''  # its entry in report['models']


@dataclasses.dataclass(frozen=True)
class RunState:
  """Where a run stands, from its files."""

  name: str
  folder: Path
  config: dict
  done: int  # iterations recorded in metrics.jsonl
  total: int
  checkpoint: int  # the newest complete checkpoint's step (0: none)
  finished: bool  # its erased model(s) are written

  @property
  def resumable(self) -> bool:
    return not self.finished and self.checkpoint > 0

  def describe(self) -> str:
    if self.finished:
      return f'finished: {self.total} iterations'
    if self.checkpoint:
      return f'stopped at iteration {self.checkpoint} of {self.total}: Resume continues it'
    return f'no checkpoint kept ({self.done} of {self.total} iterations recorded): starting it again begins anew'


def new_run(root: Path, concepts: tuple[str, ...], method: str) -> Path:
  """A fresh run folder: the time, the first concept and the method, so that the list reads in order."""
  stem = f'{time.strftime("%Y%m%d-%H%M%S")}-{commands.slug(concepts[0] if concepts else "run")[:30]}-{method}'
  folder, k = root / RUNS / stem, 2
  while folder.exists():
    folder, k = root / RUNS / f'{stem}-{k}', k + 1
  folder.mkdir(parents=True)
  return folder


def save_run_config(folder: Path, config: ml_collections.ConfigDict) -> None:
  write_json(folder / RUN_CONFIG, config.to_dict())


def run_config(folder: Path) -> ml_collections.ConfigDict:
  path = folder / RUN_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'{folder}: not a run of the app (no {RUN_CONFIG}), so there is nothing to resume.')
  return ml_collections.ConfigDict(read_json(path))


def run_names(root: Path) -> list[str]:
  """The app's runs, newest first."""
  folder = root / RUNS
  if not folder.is_dir():
    return []
  return sorted((p.name for p in folder.iterdir() if (p / RUN_CONFIG).is_file()), reverse=True)


def metrics(folder: Path) -> list[dict]:
  """The iteration records of metrics.jsonl (a line cut short by a write in progress is skipped)."""
  path = folder / 'metrics.jsonl'
  records = []
  if path.is_file():
    for line in path.read_text(encoding='utf-8', errors='replace').splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and 'step' in record and 'loss' in record:
        records.append(record)
  return records


def _checkpoint(folder: Path) -> int:
  """The newest complete checkpoint step: orbax renames a checkpoint to its step number once it is complete."""
  steps = [int(p.name) for p in (folder / 'checkpoints').glob('*') if p.name.isdigit()]
  return max(steps, default=0)


def run_state(root: Path, name: str) -> RunState:
  folder = root / RUNS / name
  config = read_json(folder / RUN_CONFIG)
  done = len(metrics(folder))
  erased = folder / 'erased'
  finished = (erased / TRAINED).is_file() or (erased / 'manifest.json').is_file()
  return RunState(name, folder, config, done, int(config['train']['iterations']), _checkpoint(folder), finished)


def losses(folder: Path) -> list[dict]:
  """{step, loss, model} rows of a run's loss curve: one model, or each of a separate-models run's."""
  rows = []
  for record in metrics(folder):
    values = record['loss'] if isinstance(record['loss'], list) else [record['loss']]
    rows += [{'step': record['step'], 'loss': v, 'model': str(m)} for m, v in enumerate(values) if v is not None]
  return rows


SETTINGS = (('model', 'model'), ('concepts', 'erase.concepts'), ('erase from', 'erase.erase_from'),
            ('method', 'erase.method'), ('convention', 'erase.convention'), ('η', 'erase.negative_guidance'),
            ('iterations', 'train.iterations'), ('learning rate', 'train.learning_rate'), ('seed', 'train.seed'),
            ('separate models', 'erase.separate_models'), ('formats', 'export.formats'),
            ('measured with', 'evaluate.classifier'))


def settings(config: dict) -> list[list[str]]:
  """[setting, value] rows of the fields a run was started with that say what it erased and how."""
  rows = []
  for label, field in SETTINGS:
    node = config
    for part in field.split('.'):
      node = node.get(part, '') if isinstance(node, dict) else ''
    value = ', '.join(map(str, node)) if isinstance(node, (list, tuple)) else str(node)
    rows.append([label, value or '—'])
  return rows


def erased_models(root: Path) -> list[ErasedModel]:
  """Every finished run's erased model(s), newest run first, then the imported weights."""
  found = []
  for name in run_names(root):
    folder = root / RUNS / name
    erased, report = folder / 'erased', folder / 'report.json'
    report = report if report.is_file() else None
    if (erased / 'manifest.json').is_file():  # separate models: one entry each
      for entry in read_json(erased / 'manifest.json')['models']:
        if entry.get('status') == 'done' and 'trained' in entry.get('formats', {}):
          found.append(ErasedModel(f'{name}/{entry["name"]}', erased / entry['formats']['trained'],
                                   (entry['prompt'],), report, entry['name']))
    elif (erased / TRAINED).is_file():
      concepts = tuple(dict.fromkeys(read_json(folder / RUN_CONFIG)['erase']['concepts']))
      found.append(ErasedModel(name, erased / TRAINED, concepts, report, 'erased'))
  imported = root / IMPORTED
  for folder in sorted(imported.iterdir()) if imported.is_dir() else ():
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.'))
    if files:
      found.append(ErasedModel(f'{IMPORTED}/{folder.name}', files[0], ()))
  return found


def find_model(root: Path, name: str) -> ErasedModel:
  for model in erased_models(root):
    if model.name == name:
      return model
  raise FileNotFoundError(f'{name!r}: no such erased model in {root} (choose one from the list).')


def report_rows(models: list[ErasedModel]) -> list[list[str]]:
  """The erasure report of each model's run (shapes world: report.json), a row per erased concept: how often the
  original and the erased model show it, and how the other concepts of its kind fared."""
  rows = []
  for model in models:
    if model.report is None:
      continue
    entry = read_json(model.report)['models'].get(model.report_key, {})
    for s in entry.get('summary', []):
      worst = max(s['others'], key=lambda k: s['others'][k]['drop'])
      drop = s['others'][worst]['drop']
      others = ', '.join(f'{k} {v["before"]:.0%}→{v["after"]:.0%}' for k, v in s['others'].items())
      rows.append([model.name, s['concept'], f'{s["base_rate"]:.0%}', f'{s["erased_rate"]:.0%}',
                   f'{worst} −{100 * drop:.0f} points' if drop > 0 else 'none', others])
  return rows


REPORT_HEADERS = ['model', 'erased concept', 'shown: original', 'shown: erased', 'largest drop of another',
                  'others: original → erased']


def import_weights(root: Path, upload: str | Path, name: str, check) -> ErasedModel:
  """Copies an ESD weights file into imported/NAME after `check(path)` (read it and lay it over the base model)
  accepted it; a name taken already is refused."""
  upload = Path(upload)
  name = commands.slug(name or upload.stem)
  folder = root / IMPORTED / name
  if folder.exists():
    raise FileExistsError(f'{folder}: an import named {name!r} exists already; choose another name.')
  check(upload)
  with atomic_path(folder) as tmp:
    tmp.mkdir()
    shutil.copyfile(upload, tmp / upload.name)
  return find_model(root, f'{IMPORTED}/{name}')


def export_download(root: Path, base: ml_collections.ConfigDict, model: ErasedModel, fmt: str, dtype: str) -> Path:
  """`export` of one erased model in one format and dtype, as one file to download: a folder format (diffusers,
  unet) zipped, a file renamed after the model."""
  from convert.erased import OUTPUTS

  stem = f'{commands.slug(model.name)}-{fmt}-{dtype}'
  workdir = root / DOWNLOADS / stem
  config = forms.export_config(base, workdir, weights=model.weights, fmt=fmt, dtype=dtype)
  commands.run('export', config)
  out = workdir / 'export' / OUTPUTS[fmt]
  if out.is_dir():
    return Path(shutil.make_archive(str(workdir / stem), 'zip', root_dir=out))
  target = workdir / f'{stem}{out.suffix}'
  out.replace(target)
  return target
