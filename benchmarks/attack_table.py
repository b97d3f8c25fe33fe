"""Is it really erased? The tables of README "Is it really erased?": the attack's success on the original model and
on every shapes-world erasure the project ships (point 1), and ESD-u "circle" with and without robust erasure at
matched iterations (point 2), with the probes of shallow erasure, on the shipped shapes-world model.

    nice -n 10 python benchmarks/attack_table.py [--seeds 4] [--prompts 2] [--out benchmarks/attack_rows.jsonl]

Each cell (one erasure: trained if its workdir holds none, then attacked and probed; its models vmapped in one
search) appends a JSON line to --out; a rerun skips the cells already there, so an interrupted sweep resumes (the
erasures resume from their checkpoints too). The tables are printed from the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from configs import any_concept, default, shapes_colour, shapes_four_models  # noqa: E402
from esd_jax import commands  # noqa: E402
from esd_jax.attack import Budget  # noqa: E402
from esd_jax.generate import text_to_image_models  # noqa: E402
from esd_jax.loading import load_model  # noqa: E402
from esd_jax.shapes_world import measure, shallow, world  # noqa: E402

WORKDIR = ROOT / 'outputs' / 'attack'
ITERATIONS = 200  # the default recipe's; point 2's rows all train this long


def _changed(get_config, **erase):
  """The config `get_config` returns with `erase` fields changed."""
  config = get_config()
  with config.ignore_type():
    config.erase.update(erase)
  return config


def _circle(**erase):
  """The default recipe (ESD-u "circle", η 3, lr 5e-5, 200 iterations) with `erase` fields changed."""
  return _changed(default.get_config, **erase)


def _any_circle(**erase):
  """configs/any_concept.py on "circle", with `erase` fields changed."""
  return _changed(any_concept.get_config, concepts=('circle',), **erase)


# Point 1: the erasures the project ships. Point 2: the default recipe with the retain loss, and with robust erasure.
ERASURES = {
    'default': _circle,
    'colour-red': lambda: shapes_colour.get_config('red'),
    'four-models': shapes_four_models.get_config,
    'circle-retain': lambda: _circle(preserve='auto', preserve_weight=1.0),
    'circle-robust': lambda: _circle(preserve='auto', preserve_weight=1.0, adversarial=True),
    # Issue 14's procedure (ESD-x from the concept's prompts, retain λ 10, erase-until), without and with robust
    # erasure: it keeps the other concepts, but it edits cross-attention only, which the attack undoes elsewhere.
    'any-circle': _any_circle,
    'any-circle-robust': lambda: _any_circle(adversarial=True),
    # The same with the inner search in the attack's form: 3 random vocabulary tokens before the prompt (prefix_k).
    'any-circle-robust-prefix': lambda: _any_circle(adversarial=True, adversarial_tokens=3),
}


def erased_models(name: str, pipe) -> list[tuple[str, dict, str]]:
  """Trains (or finds) erasure `name` and returns its models as (name, overlay, concept)."""
  config = ERASURES[name]()
  config.workdir = str(WORKDIR / name)
  config.export.formats = ('trained',)
  # Measured below, on the attack's seeds. Erase-until's probe needs the judge, which also makes erase measure its
  # result: on one seed, then.
  if config.probe.every:
    config.evaluate.seeds = config.evaluate.grid_seeds = 1
  else:
    config.evaluate.classifier = ''
  folder = Path(config.workdir) / 'erased'
  if not any(folder.rglob('unet_trained.safetensors')):
    commands.run('erase', config)
  paths = sorted(folder.rglob('unet_trained.safetensors'))
  if config.erase.separate_models:  # a batch erasure's metadata names every model's concept: its folder names one
    config.attack.concepts = tuple(p.parent.name.split('-', 1)[1] for p in paths)
  return [m for m in commands.attacked_models(config, pipe, paths) if m[0] != 'original']


def other_concepts(judge, pipe, models, seeds) -> list[dict]:
  """Per model: measure.erasure_summary of its concept against the original on the world's 16 prompts × seeds."""
  overlays = [{}] + [overlay for _, overlay, _ in models]
  images = text_to_image_models(pipe, overlays, world.PROMPTS, seeds)  # (models, seeds, prompts, …)
  reports = [measure.score(judge, world.PROMPTS, images[m].swapaxes(0, 1)) for m in range(len(overlays))]
  return [measure.erasure_summary(reports[0], reports[m + 1], concept) for m, (_, _, concept) in enumerate(models)]


def run_cell(name: str, pipe, judge, settings, seeds: list[int], prompts: int) -> dict:
  """Attacks and probes erasure `name`'s models (the original, for circle and red: 'original') on the first `prompts`
  of each concept's prompts × seeds; for an erasure, also what it did to the other concepts."""
  start = time.perf_counter()
  if name == 'original':
    models = [('original', {}, concept) for concept in ('circle', 'red')]  # the concepts of the single-model rows
  else:
    models = erased_models(name, pipe)
  budget = Budget(settings.steps, settings.tokens, settings.learning_rate, settings.objective, settings.search_steps)
  rows, _ = shallow.attack_and_probe(judge, pipe, models, [shallow.concept_prompts(c)[:prompts] for _, _, c in models],
                                     seeds,
                                     budget, key=jax.random.key(settings.seed), handoff_steps=settings.handoff,
                                     guidance=settings.guidance, steps=settings.sample_steps,
                                     guidance_scale=settings.guidance_scale)
  if name != 'original':
    for row, summary in zip(rows, other_concepts(judge, pipe, models, seeds)):
      row['erasure'] = {k: summary[k] for k in ('base_rate', 'erased_rate', 'others', 'other_kind',
                                                'worst_other_shape', 'worst_other_colour', 'max_other_drop')}
  return {'cell': name, 'seeds': len(seeds), 'prompts': prompts, 'budget': dataclasses.asdict(budget), 'models': rows,
          'seconds': round(time.perf_counter() - start, 1)}


def print_tables(cells: dict[str, dict]) -> None:
  pct = lambda v: f'{100 * v:.0f}'
  print('\n| erasure | model | concept | shown, prompt as given | attacked: continuous | attacked: discrete | '
        'handoff k = ' + ' / '.join(str(k) for k in next(iter(cells.values()))['models'][0]['handoff']) +
        ' | guidance ' + ' / '.join(next(iter(cells.values()))['models'][0]['guidance']) + ' | forms (min–max) |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, cell in cells.items():
    for row in cell['models']:
      a, forms = row['attack_success'], list(row['forms'].values())
      print(f"| {name} | {row['name']} | {row['concept']} | {pct(a['prompt'])} | {pct(a['continuous'])} | "
            f"{pct(a['discrete'])} | {' / '.join(pct(v) for v in row['handoff'].values())} | "
            f"{' / '.join(pct(v) for v in row['guidance'].values())} | {pct(min(forms))}–{pct(max(forms))} |")
  print('\n| ESD-u "circle", 200 iterations | attacked: continuous | attacked: discrete | circle shown, prompt as given | '
        'square | triangle | cross | worst other colour |')
  print('|---|---|---|---|---|---|---|---|')
  for name in ('default', 'circle-retain', 'circle-robust'):
    if name in cells:
      row = cells[name]['models'][0]
      a, e = row['attack_success'], row['erasure']
      shapes = ' | '.join(f"{pct(o['before'])}→{pct(o['after'])}" for o in e['others'].values())
      worst = e['worst_other_colour']
      print(f"| {name} | {pct(a['continuous'])} | {pct(a['discrete'])} | {pct(e['erased_rate'])} | {shapes} | "
            f"{worst['name']} −{100 * worst['drop']:.0f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', type=int, default=4, help='attacks per prompt (evaluate\'s seeds 0…n-1)')
  parser.add_argument('--prompts', type=int, default=2, help='prompts per concept (of its 4 world prompts)')
  parser.add_argument('--steps', type=int, default=0, help='Adam steps of the search; 0: attack.steps')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'attack_rows.jsonl'))
  parser.add_argument('--cells', default=','.join(['original', *ERASURES]))
  args = parser.parse_args()
  out = Path(args.out)
  done = {json.loads(line)['cell']: json.loads(line) for line in out.read_text().splitlines()} if out.is_file() else {}
  settings = default.get_config().attack
  settings.steps = args.steps or settings.steps
  pipe, judge = load_model(default.get_config()), measure.load_judge()
  for name in tqdm(args.cells.split(','), desc='cells', unit='cell'):
    if name in done:
      continue
    cell = run_cell(name, pipe, judge, settings, list(range(args.seeds)), args.prompts)
    with out.open('a') as f:
      f.write(json.dumps(cell) + '\n')
    done[name] = cell
    print(f'{name}: done in {cell["seconds"]} s', flush=True)
  print_tables(done)


if __name__ == '__main__':
  main()
