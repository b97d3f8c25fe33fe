"""The jobs behind `main.py`'s commands: each takes the experiment's ConfigDict.

`run(command, config)` checks the config for that command (esd_jax.validate) before any model loads, then
runs it. This is the top layer: it uses the ESD library (train, generate, loading) and the converters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from esd_jax import distributed, images, plots, validate
from esd_jax.generate import text_to_image, text_to_image_models
from esd_jax.loading import load_model, model_path, unet_config
from esd_jax.log import log
from esd_jax.tokenizer import warn_if_cut

def _sampling(generate_settings: ml_collections.ConfigDict) -> dict:
  """text_to_image settings from the config's generate section."""
  g = generate_settings
  return dict(negative_prompt=g.negative_prompt, guidance_scale=g.guidance_scale, num_inference_steps=g.steps,
              height=g.height or None, width=g.width or None, eta=g.eta, dtype=jnp.dtype(g.dtype),
              scheduler=None if g.scheduler == 'config' else g.scheduler)


def slug(text: str) -> str:
  """`text` as a file name: lower case, each character other than a letter or digit as '_', 60 at most."""
  return ''.join(c if c.isalnum() else '_' for c in text.lower()).strip('_')[:60] or 'empty'


def image_names(prompts: list[str]) -> list[str]:
  """A file stem per prompt, unique within the list: its slug, numbered (_2, _3, …) where an earlier prompt took it."""
  names = []
  for stem in map(slug, prompts):
    name, k = stem, 2
    while name in names:
      name, k = f'{stem}_{k}', k + 1
    names.append(name)
  return names


def generate(config: ml_collections.ConfigDict) -> Path:
  """Writes one PNG per prompt and seed, and a grid (rows: prompts, columns: seeds), to workdir/generate."""
  settings = config.generate
  prompts = list(settings.prompts)
  out = Path(config.workdir) / 'generate'
  pipe = load_model(config)
  warn_if_cut(pipe.tokenizer, prompts)
  names = image_names(prompts)
  rows = []
  start = time.perf_counter()
  main = distributed.is_main()  # several processes compute alike (each on its own devices); process 0 writes
  for seed in tqdm(settings.seeds, desc='generate', unit='seed', disable=not main):
    batch, _ = text_to_image(pipe, prompts, seed=seed, **_sampling(settings))
    rows.append(np.asarray(batch))
    for name, image in zip(names, rows[-1] if main else ()):
      images.save_png(image, out / f'{name}_seed{seed}.png')
  grid = [[rows[j][i] for j in range(len(settings.seeds))] for i in range(len(prompts))]
  if not main:
    return out / 'grid.png'
  path = images.save_grid(out / 'grid.png', grid, row_labels=prompts,
                          col_labels=[f'seed {s}' for s in settings.seeds], scale=max(1, 128 // grid[0][0].shape[0]))
  log.info('Wrote %d images and %s in %.1f s', len(prompts) * len(settings.seeds), path, time.perf_counter() - start)
  print(f'Images in {out}; grid: {path}')
  return path


def _describe(result, m: int) -> dict:
  """The manifest entry of separate model m: what it erased and how."""
  concepts = result.model_concepts(m)
  return {'prompt': concepts[0].prompt, 'erase_from': [c.erase_from for c in concepts],
          'negative_guidance': [c.negative_guidance for c in concepts],
          'learning_rate': result.learning_rates[m], 'iterations': result.iterations[m]}


def erase(config: ml_collections.ConfigDict, *, progress: bool = True, stop: threading.Event | None = None,
          on_iteration: Callable[[dict], None] | None = None):
  """Trains (or resumes) the erasure, writes the erased model(s) to workdir/erased in export.formats, and
  (evaluate.classifier set) measures them against the original. `progress`, `stop` and `on_iteration` go to
  train.run_erasure: a caller on another thread (the web app) stops the run and follows its iterations with them."""
  from convert.erased import erased_pipeline, write_erased, write_erased_models
  from esd_jax.train import run_erasure

  config = with_world_prompts(config)
  result = run_erasure(config, progress=progress, stop=stop, on_iteration=on_iteration, probe=_probe(config))
  # With several processes every one gathers the whole model (a collective); process 0 writes, the others wait.
  result = dataclasses.replace(result, pipe=distributed.local_pipeline(result.pipe),
                               trained=distributed.gather(result.trained))
  out = Path(config.workdir) / 'erased'
  kwargs = dict(dtype=config.export.dtype, metadata=result.metadata)
  main = distributed.is_main()
  if config.erase.separate_models:
    name = lambda m: f'{m:03d}-{slug(result.model_concepts(m)[0].prompt)}'
    models = [(name(m), _describe(result, m), trained) for m, _, trained in result.models()]
    failed = [{**_describe(result, m), 'name': name(m), 'why': why} for m, why in sorted(result.failed.items())]
    if main:
      write_erased_models(result.pipe, models, out, config.export.formats, failed=failed, **kwargs)
      print(f'{len(models)} erased models in {out} (manifest.json); {len(failed)} stopped')
    measured = [(name, trained, [c['prompt']]) for name, c, trained in models]
  else:
    if main:
      for fmt, path in write_erased(result.pipe, result.trained, out, config.export.formats, **kwargs).items():
        print(f'Erased model ({fmt}): {path}')
    concepts = list(dict.fromkeys(c.prompt for c in result.concepts))  # "red" erased from several prompts: once
    measured = [('erased', result.trained, concepts)]
  if main:
    workdir = Path(config.workdir)
    print(f'Training curves: {plots.training_curves(workdir / "metrics.jsonl", workdir / "training.png")}')
  distributed.barrier('erase: exported')
  if config.evaluate.classifier:  # every process samples its local copies alike; process 0 writes the report
    from esd_jax.shapes_world import measure
    # A whole erased UNet per model: built only to be measured.
    erased = {name: (erased_pipeline(result.pipe, trained), concepts) for name, trained, concepts in measured}
    evaluation = config.evaluate
    measure.measure_erasure(
        Path(config.workdir), measure.load_judge(evaluation.classifier), list(evaluation.prompts),
        list(range(evaluation.seeds)), _measure_sampling(evaluation), result.pipe, erased,
        grid_seeds=evaluation.grid_seeds, original_cache=evaluation.original_cache, run={
            'model': str(config.model), 'method': config.erase.method, 'convention': config.erase.convention,
            'negative_guidance': config.erase.negative_guidance, 'iterations': config.train.iterations,
            'learning_rate': config.train.learning_rate, 'seconds': result.seconds})
  return result


def with_world_prompts(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config with the shapes world's 'auto' fields made the lists they stand for: erase.preserve='auto', the world's
  prompts that name none of the erased concepts (world.retain_prompts); erase.erase_from='auto', each concept erased
  from every "a {colour} {shape}" prompt naming it (world.naming: one concept line per prompt, as
  configs/shapes_colour.py lists them)."""
  erase = config.erase
  if erase.preserve != 'auto' and erase.erase_from != 'auto':
    return config
  from esd_jax.shapes_world import world
  config = config.copy_and_resolve_references()
  if erase.erase_from == 'auto':
    if erase.concepts_file:
      raise validate.ConfigError("--config.erase.erase_from=auto names the shapes world's prompts for erase.concepts; "
                                 'a concepts file gives each line its own erase_from: set it there, or leave '
                                 "--config.erase.erase_from=''.")
    concepts = [erase.concepts] if isinstance(erase.concepts, str) else list(erase.concepts)
    try:
      lines = [(c, prompt) for c in concepts for prompt in world.naming(c)]
    except ValueError as e:
      raise validate.ConfigError(f'--config.erase.erase_from=auto: {e} For another model, give the prompt to erase '
                                 'it from, or none: --config.erase.erase_from=\'\'.') from e
    with config.ignore_type():
      config.erase.concepts, config.erase.erase_from = (tuple(x) for x in zip(*lines))
  if erase.preserve == 'auto':
    from esd_jax.train import concept_list
    try:
      prompts = world.retain_prompts([c.prompt for c in concept_list(config.erase)])
    except ValueError as e:
      raise validate.ConfigError(f'--config.erase.preserve=auto: {e} For another model, list the prompts to '
                                 'preserve: --config.erase.preserve="(\'a dog\', \'a house\')".') from e
    with config.ignore_type():
      config.erase.preserve = tuple(prompts)
  return config


def _probe(config: ml_collections.ConfigDict):
  """The erase-until probe config.probe asks for (None when probe.every = 0): the shapes world's, judged by
  evaluate.classifier."""
  if not config.probe.every:
    return None
  if not config.evaluate.classifier:
    raise validate.ConfigError('--config.probe.every needs a judge: the probe is the shapes world\'s, judged by '
                      '--config.evaluate.classifier (shapes-world or a classifier folder); set it, or '
                      '--config.probe.every=0.')
  from esd_jax.shapes_world import measure
  from esd_jax.shapes_world.probe import shapes_probe
  from esd_jax.train import concept_list
  try:
    concepts = list(dict.fromkeys(c.prompt for c in concept_list(config.erase)))  # "red" from 4 prompts: once
    return shapes_probe(measure.load_judge(config.evaluate.classifier), concepts, config.probe)
  except ValueError as e:
    raise validate.ConfigError(str(e)) from e


def _measure_sampling(evaluation: ml_collections.ConfigDict):
  from esd_jax.shapes_world.measure import Sampling
  return Sampling(evaluation.steps, evaluation.guidance_scale, evaluation.batch_size)


def evaluate(config: ml_collections.ConfigDict) -> dict:
  """Measures config.model (with export.weights applied, when set) on evaluate.prompts × evaluate.seeds, on
  our JAX pipeline or (evaluate.backend=diffusers) on diffusers' StableDiffusionPipeline in PyTorch; writes
  workdir/evaluate_{backend}.json and a grid of the first evaluate.grid_seeds seeds."""
  from esd_jax.files import write_json
  from esd_jax.generate import latent_size
  from esd_jax.shapes_world import measure

  evaluation = config.evaluate
  prompts, seeds, sampling = list(evaluation.prompts), list(range(evaluation.seeds)), _measure_sampling(evaluation)
  backend = evaluation.backend
  if backend == 'diffusers':
    folder = Path(model_path(config.model, config.workdir))
    if config.export.weights or not (folder / 'model_index.json').is_file():
      raise validate.ConfigError(
          'evaluate.backend=diffusers runs a diffusers pipeline folder as it is: point --config.model at one (e.g. '
          'an erased model exported with export.formats=diffusers) and leave export.weights empty.')
  judge = measure.load_judge(evaluation.classifier)
  pipe = load_model(config)
  if config.export.weights:
    from convert.erased import erased_pipeline
    pipe = erased_pipeline(pipe, _weights(config))
  start = time.perf_counter()
  if backend == 'jax':
    generated = measure.generate_jax(pipe, prompts, seeds, sampling)
  else:
    generated = measure.generate_diffusers(folder, prompts, seeds, sampling,
                                           latent_shape=(*latent_size(pipe, None, None), pipe.unet.config['in_channels']))
  report = {'model': str(config.model), 'weights': config.export.weights, 'backend': backend,
            'images_per_prompt': len(seeds), 'seconds': round(time.perf_counter() - start, 1),
            'per_prompt': measure.score(judge, prompts, generated)}
  workdir = Path(config.workdir)
  if not distributed.is_main():  # several processes computed alike; process 0 writes
    return report
  write_json(workdir / f'evaluate_{backend}.json', report)
  measure.comparison_grid(workdir / f'evaluate_{backend}.png', prompts, {backend: generated}, evaluation.grid_seeds)
  for prompt, r in report['per_prompt'].items():
    shown = '  '.join(f'{k} {r[k]:.0%}' for k in ('shape', 'colour') if r[k] is not None)
    print(f'{prompt:24s} {shown}')
  print(f'Report: {workdir / f"evaluate_{backend}.json"}')
  return report


def _weights(config: ml_collections.ConfigDict):
  """The ESD weights that `export`, `compare` and `evaluate` use: export.weights, or this workdir's erasure."""
  from convert.esd_weights import read_esd_weights

  path = config.export.weights or Path(config.workdir) / 'erased' / 'unet_trained.safetensors'
  if not Path(path).is_file():
    raise FileNotFoundError(f'{path}: no ESD weights. Run `erase` with this workdir first, or point '
                            '--config.export.weights at a weights file (ours or the authors\' .pt/.safetensors).')
  return read_esd_weights(path)


def export(config: ml_collections.ConfigDict) -> dict:
  """Writes the base model with ESD weights applied to workdir/export, in every format of export.formats."""
  from convert.erased import write_erased

  weights = _weights(config)
  if not distributed.is_main():  # process 0 writes
    return {}
  paths = write_erased(load_model(config), weights, Path(config.workdir) / 'export', config.export.formats,
                       dtype=config.export.dtype, metadata={'weights': weights.source, **weights.metadata})
  for fmt, path in paths.items():
    print(f'{fmt}: {path}')
  return paths


def weights_overlay(pipe, weights: Mapping) -> dict:
  """ESD weights as an overlay of `pipe`'s UNet parameters: the tensors they change, held layout (checked against
  the base)."""
  from convert.erased import erased_pipeline
  from esd_jax.models.state_dict import split_flat

  held = split_flat(erased_pipeline(pipe, weights).unet)[1]
  return {k: held[k] for k in weights}


def compare_images(pipe, models: Mapping[str, Mapping | None], settings: ml_collections.ConfigDict) -> np.ndarray:
  """Images (models, seeds, prompts, H, W, 3) of `pipe` with each model's ESD weights laid over it (None: the
  original), for settings.prompts × settings.seeds (a generate section), all in one jitted batch; seed s gives
  every model the noise `generate` draws for it."""
  overlays = [{} if weights is None else weights_overlay(pipe, weights) for weights in models.values()]
  warn_if_cut(pipe.tokenizer, list(settings.prompts))
  return text_to_image_models(pipe, overlays, list(settings.prompts), list(settings.seeds), **_sampling(settings))


def compare_grid(path: Path, names: list[str], generated: np.ndarray, prompts: list[str], seeds: list[int]) -> Path:
  """compare_images' output as a labelled grid: a row per prompt, for each seed a column per model."""
  rows = [[generated[m, s, i] for s in range(len(seeds)) for m in range(len(names))] for i in range(len(prompts))]
  return images.save_grid(path, rows, row_labels=prompts, col_labels=[f'{n} {seed}' for seed in seeds for n in names],
                          scale=max(1, 128 // rows[0][0].shape[0]))


def compare(config: ml_collections.ConfigDict) -> Path:
  """Original vs erased, side by side, for generate.prompts × generate.seeds: workdir/compare/grid.png."""
  settings = config.generate
  weights = _weights(config)
  pipe = load_model(config)
  generated = compare_images(pipe, {'original': None, 'erased': weights}, settings)
  if not distributed.is_main():  # several processes compute alike; process 0 writes
    return Path(config.workdir) / 'compare' / 'grid.png'
  path = compare_grid(Path(config.workdir) / 'compare' / 'grid.png', ['original', 'erased'], generated,
                      list(settings.prompts), list(settings.seeds))
  print(f'Original vs erased ({weights.source}): {path}')
  return path


def attack(config: ml_collections.ConfigDict) -> dict:
  """Searches, white-box, for prompts that bring each erased model's concept back, attacks the original model beside
  them, and (attack.classifier set) measures the attack's success and the probes of shallow erasure: writes
  workdir/attack/report.json and grid.png (README "Is it really erased?"). The models and attacks lie on the mesh of
  config.mesh as erase's do; the search saves its state every attack.checkpoint_every steps in
  workdir/attack/search.safetensors, and a rerun resumes from it (a report of these settings is not recomputed)."""
  import jax

  from esd_jax.attack import Budget, Placement, Saved, run_attack
  from esd_jax.files import parse_json, write_json
  from esd_jax.shapes_world import measure, shallow
  from esd_jax.sharding import make_mesh
  from esd_jax.workdir import lock_workdir

  settings = config.attack
  workdir = Path(config.workdir)
  out = workdir / 'attack'
  with lock_workdir(workdir, 'attack') if distributed.is_main() else contextlib.nullcontext():
    paths = _attacked_files(config)
    # What the report depends on (weights files by size and time written), through JSON as report.json reads back: a
    # report of these settings is the answer.
    asked = json.loads(json.dumps({'model': str(config.model), 'attack': {
        k: v for k, v in settings.to_dict().items() if k != 'checkpoint_every'}, 'weights': [
            [str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]}))
    done = parse_json((out / 'report.json').read_text(), str(out / 'report.json')) if (
        out / 'report.json').is_file() else {}
    if done.get('settings') == asked:
      print(f'Report: {out / "report.json"} (already made with these settings; delete it to make it again)')
      return done
    placement = Placement(make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.concept),
                          config.mesh.min_shard_size)
    pipe = load_model(config, sharding=placement.param_sharding)
    models = attacked_models(config, pipe, paths)
    prompts = [list(settings.prompts) or shallow.concept_prompts(concept) for _, _, concept in models]
    placement.check(len(models), len(prompts[0]) * settings.seeds)  # before anything is computed
    warn_if_cut(pipe.tokenizer, [p for model in prompts for p in model])
    sampling = dict(steps=settings.sample_steps, guidance_scale=settings.guidance_scale)
    budget = Budget(settings.steps, settings.tokens, settings.learning_rate, settings.objective, settings.search_steps)
    saved = Saved(out / 'search.safetensors', settings.checkpoint_every, {
        'model': str(config.model), 'weights': [str(p) for p in paths], 'concepts': [c for _, _, c in models],
        'classifier': settings.classifier})
    common = dict(key=jax.random.key(settings.seed), placement=placement, saved=saved, progress=True, **sampling)
    seeds = range(settings.seeds)
    if settings.classifier:
      rows, found = shallow.attack_and_probe(measure.load_judge(settings.classifier), pipe, models, prompts, seeds,
                                             budget, handoff_steps=settings.handoff, guidance=settings.guidance,
                                             forms=settings.forms, **common)
    else:  # no judge: the denoise objective (validate.check refused the classifier one), prompts and grid only
      found = run_attack(pipe, [overlay for _, overlay, _ in models], prompts, seeds, shallow.seed_noise(pipe, seeds),
                         budget, **common)
      rows = [{'name': name, 'concept': concept, 'prompts': p, 'found': found.texts[m]}
              for m, ((name, _, concept), p) in enumerate(zip(models, prompts))]
    names = [name for name, _, _ in models]
    report = {'model': str(config.model),
              'budget': {k: settings[k] for k in ('steps', 'tokens', 'learning_rate', 'objective', 'search_steps')},
              'seeds': settings.seeds, 'sample_steps': settings.sample_steps,
              'guidance_scale': settings.guidance_scale, 'models': rows, 'settings': asked}
    if not distributed.is_main():
      return report
    grid, labels, columns = shallow.attack_grid(found, names, settings.grid_seeds)
    path = images.save_grid(out / 'grid.png', grid, row_labels=labels, col_labels=columns,
                            scale=max(1, 128 // grid[0][0].shape[0]))
    write_json(out / 'report.json', report)  # last: a report on disk says the grid is there too
  for row in rows:
    rates = row.get('attack_success')
    shown = '' if rates is None else ('  concept shown: prompt {prompt:.0%}, attacked {continuous:.0%} (continuous), '
                                      '{discrete:.0%} (discrete)').format(**rates)
    print(f'[{row["name"]}] {row["concept"]}{shown}')
  print(f'Report: {out / "report.json"}; grid: {path}')
  return report


def _attacked_files(config: ml_collections.ConfigDict) -> list[Path]:
  """The ESD weights files `attack` attacks: attack.weights, or this workdir's erasure."""
  paths = [Path(p) for p in config.attack.weights] or [Path(config.workdir) / 'erased' / 'unet_trained.safetensors']
  for path in paths:
    if not path.is_file():
      raise FileNotFoundError(f'{path}: no ESD weights. Run `erase` with this workdir first, or list weights files '
                              'in --config.attack.weights.')
  return paths


def attacked_models(config: ml_collections.ConfigDict, pipe, paths: list[Path]) -> list[tuple[str, dict, str]]:
  """(name, overlay, concept) of every model `attack` attacks: the original once per concept, then each weights
  file of `paths` (_attacked_files)."""
  from convert.esd_weights import read_esd_weights
  from esd_jax.files import parse_json

  concepts = list(config.attack.concepts)
  if concepts and len(concepts) != len(paths):
    raise validate.ConfigError(f'--config.attack.concepts names {len(concepts)} concepts for {len(paths)} weights '
                               'files: give one per file of --config.attack.weights, or () to read each from its file.')
  erased = []
  for i, path in enumerate(paths):
    weights = read_esd_weights(path)
    if concepts:
      concept = concepts[i]
    else:
      named = list(dict.fromkeys(parse_json(weights.metadata.get('esd_jax.run', '{}'), str(path)).get('concepts', [])))
      if len(named) != 1:
        raise validate.ConfigError(f'{path} names {named or "no"} concept(s) in its metadata; say which one to attack: '
                                   '--config.attack.concepts="(\'circle\',)", one per weights file.')
      concept = named[0]
    folder = Path(path).parent  # a run's erased/ folder, or a model's folder of a batch erasure
    name = folder.parent.name if folder.name == 'erased' else folder.name
    erased.append((name, weights_overlay(pipe, weights), concept))
  originals = [('original', {}, concept) for concept in dict.fromkeys(c for _, _, c in erased)]
  return originals + erased


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Prints what the erasure would train: tensors, parameters and Adam state bytes, from the UNet config alone."""
  from esd_jax.methods import summary
  from esd_jax.models import build_abstract
  from esd_jax.models.state_dict import param_shapes

  unet = unet_config(config.model, config.workdir, prediction_type=config.prediction_type or None)
  info = summary(param_shapes(build_abstract(unet)), config.erase.method, config.erase.patterns)
  if not distributed.is_main():
    return info
  print(f'model            {config.model}')
  print(f'method           {config.erase.method}')
  print(f'trained tensors  {info["tensors"]:,} of {info["total_tensors"]:,}')
  print(f'trained params   {info["parameters"]:,} of {info["total_parameters"]:,} '
        f'({100 * info["parameters"] / info["total_parameters"]:.2f} %)')
  print(f'Adam state       {info["optimizer_state_bytes"] / 2**20:,.1f} MiB (fp32 mu and nu)')
  return info


def plan(config: ml_collections.ConfigDict) -> dict:
  """Compiles the erase step of this config from abstract parameters on its mesh (no weights) and prints what it
  costs per device: memory, FLOPs, collectives (esd_jax/cost.py)."""
  from esd_jax.cost import step_cost
  from esd_jax.files import write_json

  cost = step_cost(with_world_prompts(config))
  if not distributed.is_main():
    return cost
  size = lambda key: _bytes(cost['per_device_bytes'][key])
  flops = cost['flops']
  mesh = ' × '.join(f'{axis} {n}' for axis, n in cost['mesh'].items())
  extra = f', {cost["separate_models"]} separate models' if cost['separate_models'] else ''
  extra += f', robust erasure: {cost["adversarial_steps"]} search steps' if cost['adversarial_steps'] else ''
  print(f'{cost["model"]} {cost["method"]} ({cost["convention"]}, {cost["compute_dtype"]} compute, frozen base '
        f'{cost["frozen_dtype"]}, remat {cost["remat"]}, {cost["attention"]} attention{extra}), latents '
        f'{"×".join(map(str, cost["latent_shape"]))}, batch {cost["batch"]}; mesh {mesh} = {cost["devices"]} '
        f'{cost["platform"]} devices')
  print(f'trained: {cost["trained_tensors"]} tensors, {cost["trained_parameters"]:,} parameters')
  print('per device:')
  for key, what in (('frozen_base', 'frozen base'), ('trained', 'trained subset'), ('adam', 'Adam moments'),
                    ('arguments', 'arguments (XLA)'), ('temporaries', 'temporaries (XLA)'),
                    ('total', 'total (XLA: arguments + outputs - donated + temporaries)')):
    print(f'  {what:58s} {size(key):>10s}')
  shortest, mean, longest = flops['sampler_steps']
  print(f'FLOP per iteration: XLA {_si(flops["xla_per_iteration"])} (the sampler loop body once); one UNet forward '
        f'{_si(flops["unet_forward"])}, × the forwards of a draw: {_si(flops["shortest_draw"])} ({shortest} sampler '
        f'steps), {_si(flops["mean_draw"])} (mean, {mean:.2f}), {_si(flops["longest_draw"])} ({longest})')
  moved = {k: v for k, v in cost['collective_bytes_per_device'].items() if v}
  print('collectives per device (each instruction once): ' + (
      ', '.join(f'{k} {_bytes(v)}' for k, v in moved.items()) or 'none'))
  if config.plan.json:
    write_json(Path(config.plan.json), cost)
    print(f'JSON: {config.plan.json}')
  return cost


def _bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.2f} {unit}' if unit != 'B' else f'{n:.0f} B'
    n /= 1024


def _si(flops: float) -> str:
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6)):
    if flops >= scale:
      return f'{flops / scale:.2f} {unit}'
  return f'{flops:.0f} '


def train_world(config: ml_collections.ConfigDict) -> Path:
  """Trains the shapes-world pipeline and its classifier (configs/train_world.py) into config.output."""
  from esd_jax.shapes_world.classifier import train_and_save
  from esd_jax.shapes_world.trainer import Recipe, train_world_model

  out = Path(config.output)
  record = train_and_save(config.classifier.steps, config.classifier.seed, out / 'shapes_classifier')
  print(f'Classifier: {out / "shapes_classifier"}, held-out accuracy {record["held_out_accuracy"]}')
  _, record = train_world_model(out / 'shapes_world', Recipe(**config.world.to_dict()))
  print(f'Shapes-world pipeline: {out / "shapes_world"} ({record["seconds"]})')
  return out


COMMANDS = {'erase': erase, 'generate': generate, 'evaluate': evaluate, 'train_world': train_world,
            'dry_run': dry_run, 'plan': plan, 'export': export, 'compare': compare, 'attack': attack}


def run(names: str | list[str], config: ml_collections.ConfigDict) -> list:
  """Checks `config` for every command of `names` (one name or several), then runs them in order; returns each
  one's result."""
  names = [names] if isinstance(names, str) else list(names)
  for name in names:
    validate.check(config, name)  # an unknown name too
  results = []
  for name in names:
    results.append(COMMANDS[name](config))
    distributed.barrier(f'{name}: done')  # no process goes on while process 0 still writes
  return results
