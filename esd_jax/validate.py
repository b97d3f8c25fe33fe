"""Checks a run's config before any work: `check(config, command)` raises ConfigError on the first bad field.

Every field a command reads has a rule here (RULES: a predicate and the text of what is valid); COMMAND_FIELDS
says which fields each command reads, and a few small functions (RELATIONS) check fields that depend on each
other. The message names the field as it is set on the command line (`--config.train.iterations`), the bad
value and what is valid. A field the config lacks is not checked (a config for one command need not carry the
sections of another); the command itself then says what is missing.

For `erase` the concept list is read too (esd_jax.concepts.of_config): a bad list or concepts file is refused
here as a ConfigError that names erase.concepts_file (or erase.concepts, erase.erase_from) and carries the
ConceptError's text (which names the file's line or entry). `evaluate.classifier` and `export.weights` must name
files that exist, where the command reads them.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esd_jax.concepts import ConceptError, of_config
from esd_jax.methods import method_names

COMPUTE_DTYPES = ('float32', 'bfloat16')  # what the models compute in (parameters stay float32)


class ConfigError(ValueError):
  """A config field holds a value its command cannot use; the message names the field and what is valid."""


_MISSING = object()


def _is_whole(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _choices(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Sequence[str]:
  return choices() if callable(choices) else choices


# Rules: (predicate, text of what is valid). The text may be a callable for choices imported on use.
def _whole(low: int, high: int | None = None):
  text = f'a whole number ≥ {low}' + ('' if high is None else f' and ≤ {high}')
  return (lambda v: _is_whole(v) and v >= low and (high is None or v <= high)), text


def _real(low: float, *, above: bool = False, high: float | None = None, below: bool = False):
  """A finite number ≥ low (> low with `above`), and ≤ high (< high with `below`) when high is given."""
  def ok(v):
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            and (v > low if above else v >= low) and (high is None or (v < high if below else v <= high)))
  text = f'a finite number {">" if above else "≥"} {low:g}'
  return ok, text + ('' if high is None else f' and {"<" if below else "≤"} {high:g}')


def _one_of(choices):
  return (lambda v: isinstance(v, str) and v in _choices(choices)), (lambda: f'one of {list(_choices(choices))}')


def _text(*, nonempty: bool = False):
  return (lambda v: isinstance(v, str) and (bool(v.strip()) or not nonempty)), (
      'a non-empty string' if nonempty else 'a string')


def _flag():
  return (lambda v: isinstance(v, bool)), 'True or False'


def _size():
  """An image size: 0 (the model's native size) or a positive multiple of 8 (the VAE's downsampling)."""
  return (lambda v: _is_whole(v) and v >= 0 and v % 8 == 0), 'a multiple of 8 ≥ 0 (0: the model\'s native size)'


def _list(item: Callable[[Any], bool], what: str, example: str):
  """A non-empty list or tuple (not a string) of items that satisfy `item`."""
  return (lambda v: isinstance(v, (list, tuple)) and bool(v) and all(item(x) for x in v)), (
      f'a non-empty list of {what}, e.g. {example}')


def _subset(choices):
  """A non-empty list or tuple of some of `choices`."""
  ok = lambda v: isinstance(v, (list, tuple)) and bool(v) and all(x in _choices(choices) for x in v)
  return ok, lambda: f'a non-empty list of {list(_choices(choices))}, e.g. "(\'{_choices(choices)[0]}\',)"'


def _devices():
  """A mesh axis size: a whole number ≥ 1, or -1 for the devices the other axes leave."""
  return (lambda v: _is_whole(v) and (v >= 1 or v == -1)), 'a whole number ≥ 1, or -1 (the remaining devices)'


def _is_prompt(v):
  return isinstance(v, str) and bool(v.strip())


def _formats():
  from convert.erased import FORMATS
  return FORMATS


def _export_dtypes():
  from esd_jax.files import DTYPES
  return sorted(DTYPES)


def _remat():
  from esd_jax.models.unet import REMAT
  return list(REMAT)


def _attention():
  from esd_jax.models.attention import IMPLEMENTATIONS
  return IMPLEMENTATIONS


def _conventions():
  from esd_jax.esd import CONVENTIONS
  return CONVENTIONS


RULES: dict[str, tuple[Callable[[Any], bool], str | Callable[[], str]]] = {
    'model': _text(nonempty=True),
    'variant': _text(),
    'tokenizer': _text(),
    'prediction_type': _one_of(('', 'epsilon', 'v_prediction')),
    'attention': _one_of(_attention),
    'workdir': _text(nonempty=True),

    'erase.separate_models': _flag(),
    'erase.method': _one_of(lambda: method_names() + ['patterns']),
    'erase.patterns': ((lambda v: isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)),
                       'a list of regular expressions over diffusers parameter names, e.g. "(\'attn2\',)"'),
    'erase.convention': _one_of(_conventions),
    'erase.negative_guidance': _real(0),  # η < 0 would train toward the concept
    'erase.guidance': _real(0),
    'erase.ddim_steps': _whole(2),
    'erase.sampler': _one_of(('ddim', 'pndm')),
    'erase.resolution': _size(),
    'erase.preserve': ((lambda v: v == 'auto' or (isinstance(v, (list, tuple)) and all(_is_prompt(p) for p in v))),
                       '"auto" (the shapes world\'s other prompts) or a list of non-empty prompts, e.g. '
                       '"(\'a dog\', \'a photo of a cat\')", () for none'),
    'erase.preserve_weight': _real(0),
    'erase.adversarial': _flag(),
    'erase.adversarial_steps': _whole(0),  # 0: plain ESD, exactly
    'erase.adversarial_learning_rate': _real(0, above=True),
    'erase.adversarial_tokens': _whole(0),

    'train.iterations': _whole(1),
    'train.learning_rate': _real(0, above=True),
    'train.batch_size': _whole(1),
    'train.concepts_per_step': _whole(1),
    'train.shared_timesteps': _flag(),
    'train.seed': _whole(0),
    'train.compute_dtype': _one_of(COMPUTE_DTYPES),
    'train.remat': _one_of(_remat),
    'train.frozen_dtype': _one_of(('auto', *COMPUTE_DTYPES)),
    'train.checkpoint_every': _whole(1),
    'checkpoint.keep': _whole(1),

    'mesh.concept': _whole(1),
    'mesh.data': _devices(),
    'mesh.fsdp': _devices(),
    'mesh.min_shard_size': _whole(0),
    'mesh.distributed': _flag(),
    'mesh.coordinator_address': _text(),
    'mesh.num_processes': _whole(0),
    'mesh.process_id': _whole(-1),
    'mesh.initialization_timeout_s': _whole(1),
    'mesh.heartbeat_timeout_s': _whole(1),

    'export.formats': _subset(_formats),
    'export.dtype': _one_of(_export_dtypes),
    'export.weights': _text(),

    'generate.prompts': _list(_is_prompt, 'non-empty prompts', '"(\'a cat\', \'a dog\')"'),
    'generate.negative_prompt': _text(),
    'generate.seeds': _list(lambda v: _is_whole(v) and v >= 0, 'whole numbers ≥ 0', '"(0, 1, 2)"'),
    'generate.guidance_scale': _real(0),
    'generate.steps': _whole(1),
    'generate.scheduler': _one_of(('ddim', 'pndm', 'config')),
    'generate.eta': _real(0, high=1),  # DDIM's η; above 1 the step takes the square root of a negative number
    'generate.height': _size(),
    'generate.width': _size(),
    'generate.dtype': _one_of(COMPUTE_DTYPES),

    'evaluate.classifier': _text(),
    'evaluate.prompts': _list(_is_prompt, 'non-empty prompts', '"(\'a red circle\',)"'),
    'evaluate.seeds': _whole(1),
    'evaluate.steps': _whole(1),
    'evaluate.guidance_scale': _real(0),
    'evaluate.batch_size': _whole(1),
    'evaluate.grid_seeds': _whole(0),
    'evaluate.original_cache': _text(),
    'evaluate.backend': _one_of(('jax', 'diffusers')),

    'attack.weights': ((lambda v: isinstance(v, (list, tuple)) and all(_is_prompt(p) for p in v)),
                       'a list of ESD weights files, e.g. "(\'outputs/default/erased/unet_trained.safetensors\',)", '
                       "or () for this workdir's erasure"),
    'attack.concepts': ((lambda v: isinstance(v, (list, tuple)) and all(_is_prompt(p) for p in v)),
                        'a list of concepts, one per weights file, e.g. "(\'circle\',)", or () to read them from the '
                        'files'),
    'attack.prompts': ((lambda v: isinstance(v, (list, tuple)) and all(_is_prompt(p) for p in v)),
                       'a list of prompts, e.g. "(\'a red circle\',)", or () for the shapes world\'s prompts naming '
                       'the concept'),
    'attack.seeds': _whole(1),
    'attack.steps': _whole(0),
    'attack.tokens': _whole(1),
    'attack.learning_rate': _real(0, above=True),
    'attack.seed': _whole(0),
    'attack.checkpoint_every': _whole(1),
    'attack.objective': _one_of(('classifier', 'denoise')),
    'attack.search_steps': _whole(1),
    'attack.sample_steps': _whole(1),
    'attack.guidance_scale': _real(0),
    'attack.classifier': _text(),
    'attack.handoff': ((lambda v: isinstance(v, (list, tuple)) and all(_is_whole(k) and k >= 0 for k in v)),
                       'a list of DDIM steps ≥ 0 (at most attack.sample_steps), e.g. "(0, 10, 20)", or () for none'),
    'attack.guidance': ((lambda v: isinstance(v, (list, tuple)) and all(_real(0)[0](g) for g in v)),
                        'a list of guidance scales ≥ 0, e.g. "(7.5, 15.0)", or () for none'),
    'attack.forms': ((lambda v: isinstance(v, (list, tuple)) and all(_is_prompt(p) for p in v)),
                     'a list of prompts naming the concept, e.g. "(\'a circle\',)", or () for the default forms'),
    'attack.grid_seeds': _whole(1),

    'probe.every': _whole(0),
    'probe.seeds': _whole(1),
    'probe.steps': _whole(1),
    'probe.guidance_scale': _real(0),
    'probe.max_shown': _real(0, high=1),
    'probe.max_drop': _real(0, high=1),
    'probe.confirm_max_drop': _real(0, high=1),
    'probe.confirm_seeds': _whole(0),
    'probe.confirm_steps': _whole(1),
    'probe.settle_learning_rate': _real(0, above=True),
    'probe.settle_preserve_weight': _real(0, above=True),

    'plan.devices': _whole(0),
    'plan.json': _text(),

    'serve.host': _text(nonempty=True),
    'serve.port': _whole(1, 65535),
    'serve.max_upload_mb': _whole(1),

    # configs/train_world.py (the fields of esd_jax.shapes_world.trainer.Recipe, and the classifier's).
    'output': _text(nonempty=True),
    'world.seed': _whole(0),
    'world.vae_steps': _whole(1),
    'world.vae_batch': _whole(1),
    'world.vae_learning_rate': _real(0, above=True),
    'world.kl_weight': _real(0),
    'world.unet_steps': _whole(1),
    'world.unet_batch': _whole(1),
    'world.unet_learning_rate': _real(0, above=True),
    'world.ema_decay': _real(0, high=1, below=True),
    'classifier.steps': _whole(1),
    'classifier.seed': _whole(0),
}


def _section(name: str) -> tuple[str, ...]:
  return tuple(k for k in RULES if k.startswith(name + '.'))


# what esd_jax.loading.load_model reads
_LOAD = ('model', 'variant', 'tokenizer', 'prediction_type', 'attention', 'workdir')
_MEASURE = tuple(k for k in _section('evaluate') if k != 'evaluate.backend')  # erase measures on JAX

COMMAND_FIELDS: dict[str, tuple[str, ...]] = {
    'erase': (*_LOAD, *_section('erase'), *_section('train'), *_section('checkpoint'), *_section('mesh'),
              'export.formats', 'export.dtype', 'evaluate.classifier', *_section('probe')),  # and _MEASURE
    'generate': (*_LOAD, *_section('generate')),
    'compare': (*_LOAD, *_section('generate'), 'export.weights'),
    'evaluate': (*_LOAD, *_section('evaluate'), 'export.weights'),
    'export': (*_LOAD, *_section('export')),
    'dry_run': ('model', 'workdir', 'prediction_type', 'erase.method', 'erase.patterns'),
    'plan': ('model', 'workdir', 'prediction_type', 'attention', *_section('erase'), *_section('train'),
             *_section('mesh'), *_section('plan')),
    'train_world': ('output', *_section('world'), *_section('classifier')),
    'attack': (*_LOAD, *_section('attack'), *_section('mesh')),
    # the forms' defaults (erase, generate, export, evaluate) are checked when a form is submitted
    'serve': (*_LOAD, *_section('serve'), 'mesh.distributed'),
}


def _get(config, field: str) -> Any:
  """config's `field` (dotted), or _MISSING."""
  node = config
  for part in field.split('.'):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      return _MISSING
  return node


def _fail(field: str, value: Any, valid: str) -> ConfigError:
  return ConfigError(f'--config.{field}={value!r} is not valid: expected {valid}.')


def _rule(config, field: str) -> None:
  value = _get(config, field)
  if value is _MISSING:
    return
  ok, text = RULES[field]
  if not ok(value):
    raise _fail(field, value, text() if callable(text) else text)


# Checks of fields that depend on each other (each runs after the fields' own rules passed).
def _sampler(config) -> None:
  if _get(config, 'erase.sampler') == 'pndm' and _get(config, 'erase.convention') != 'diffusers-v2':
    raise _fail('erase.sampler', 'pndm', f"'ddim' (pndm only with --config.erase.convention=diffusers-v2, not "
                                        f"{_get(config, 'erase.convention')!r})")


def _mesh(config) -> None:
  if _get(config, 'mesh.data') == -1 and _get(config, 'mesh.fsdp') == -1:
    raise _fail('mesh.fsdp', -1, 'a whole number ≥ 1 while --config.mesh.data=-1 (at most one of mesh.data and '
                                 'mesh.fsdp may be -1)')


def _patterns(config) -> None:
  if _get(config, 'erase.method') != 'patterns':
    return
  patterns = _get(config, 'erase.patterns')
  if not patterns:
    raise _fail('erase.patterns', patterns, "a non-empty list of regular expressions over diffusers parameter "
                                            "names with --config.erase.method=patterns, e.g. \"('attn2',)\"")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise _fail('erase.patterns', patterns, f'regular expressions ({p!r}: {e})') from e


def _separate(config) -> None:
  separate = _get(config, 'erase.separate_models')
  if separate is True and _get(config, 'train.concepts_per_step') not in (1, _MISSING):
    raise _fail('train.concepts_per_step', _get(config, 'train.concepts_per_step'),
                '1 with --config.erase.separate_models=True (each model erases its own concept)')
  if _get(config, 'train.shared_timesteps') is True and separate is False:
    raise _fail('train.shared_timesteps', True, 'False unless --config.erase.separate_models=True (it aligns the '
                                               'draws of separate models)')


def _concepts(config) -> None:
  erase = _get(config, 'erase')
  if erase is _MISSING:
    return
  try:
    of_config(erase)
  except ConceptError as e:
    field = ('erase.concepts_file' if _get(config, 'erase.concepts_file') else
             'erase.erase_from' if str(e).startswith('erase.erase_from') else 'erase.concepts')
    raise ConfigError(f'--config.{field}={_get(config, field)!r} is not valid: {e}') from e


def _evaluate_classifier(config) -> None:
  if _get(config, 'evaluate.classifier') == '':
    raise _fail('evaluate.classifier', '', "'shapes-world' (the shipped classifier) or a classifier folder: "
                                           '`evaluate` measures with it')


def _classifier_folder(config) -> None:
  name = _get(config, 'evaluate.classifier')
  if name not in ('', 'shapes-world', _MISSING) and not (Path(name) / 'config.json').is_file():
    raise _fail('evaluate.classifier', name, "'shapes-world' (the shipped classifier) or a classifier folder (one "
                                             "with config.json; this is none), or '' for erase to measure nothing")


def _weights_file(config) -> None:
  weights = _get(config, 'export.weights')
  if weights not in ('', _MISSING) and not Path(weights).is_file():
    raise _fail('export.weights', weights, "an ESD weights file (ours or the authors' .pt/.safetensors; this is no "
                                           "file), or '' for the erasure in this workdir")


def _diffusers_backend(config) -> None:
  if _get(config, 'evaluate.backend') == 'diffusers' and _get(config, 'export.weights') not in ('', _MISSING):
    raise _fail('export.weights', _get(config, 'export.weights'),
                "'' with --config.evaluate.backend=diffusers (it runs a diffusers pipeline folder as it is: export "
                'the erased model with export.formats=diffusers and point --config.model at it)')


def _recipe(config) -> None:
  import dataclasses

  from esd_jax.shapes_world.trainer import Recipe

  world = _get(config, 'world')
  known = {f.name for f in dataclasses.fields(Recipe)}
  unknown = sorted(set(world) - known) if world is not _MISSING else []
  if unknown:
    raise ConfigError(f'--config.world.{unknown[0]}: no such field; the world recipe '
                      f'(esd_jax.shapes_world.trainer.Recipe) has {sorted(known)}.')


def _adversarial(config) -> None:
  if _get(config, 'erase.adversarial') is True and _get(config, 'erase.separate_models') is True:
    raise _fail('erase.adversarial', True, 'False with --config.erase.separate_models=True (robust erasure trains one '
                                           'model; erase each concept in a run of its own)')


def _attack_files(config) -> None:
  if _get(config, 'attack') is _MISSING:
    return
  for path in _get(config, 'attack.weights'):
    if not Path(path).is_file():
      raise _fail('attack.weights', _get(config, 'attack.weights'), f"ESD weights files ({path} is no file), or () for "
                                                                     "this workdir's erasure")
  name = _get(config, 'attack.classifier')
  if name not in ('', 'shapes-world') and not (Path(name) / 'config.json').is_file():
    raise _fail('attack.classifier', name, "'shapes-world' (the shipped classifier), a classifier folder (one with "
                                           "config.json; this is none), or '' to search without judging")
  if name == '' and _get(config, 'attack.objective') == 'classifier':
    raise _fail('attack.objective', 'classifier', "'denoise' with --config.attack.classifier='' (the classifier "
                                                  'objective needs a judge: set attack.classifier to one)')
  # The probes (handoff among them) run only where a judge says what came back.
  if name and any(k > _get(config, 'attack.sample_steps') for k in _get(config, 'attack.handoff')):
    raise _fail('attack.handoff', _get(config, 'attack.handoff'),
                f'DDIM steps ≤ --config.attack.sample_steps={_get(config, "attack.sample_steps")}')


def _one_process(config) -> None:
  if _get(config, 'mesh.distributed') is True:
    raise _fail('mesh.distributed', True, 'False with `serve` (the web app runs in one process)')


RELATIONS: dict[str, tuple[Callable[[Any], None], ...]] = {
    'erase': (_sampler, _mesh, _patterns, _separate, _concepts, _classifier_folder, _adversarial),
    'dry_run': (_patterns,),
    'plan': (_sampler, _mesh, _patterns, _separate, _concepts, _adversarial),
    'attack': (_mesh, _attack_files),
    'evaluate': (_evaluate_classifier, _classifier_folder, _weights_file, _diffusers_backend),
    'export': (_weights_file,),
    'compare': (_weights_file,),
    'train_world': (_recipe,),
    'serve': (_one_process,),
}


def check(config, command: str) -> None:
  """Raises ConfigError naming the first field of `config` that `command` reads and cannot use.

  Reads no model and writes nothing; it reads the concepts file (erase), and sees that the files named by
  export.weights and evaluate.classifier exist."""
  if command not in COMMAND_FIELDS:
    raise ConfigError(f'Unknown command {command!r}; choose one of {sorted(COMMAND_FIELDS)}.')
  fields = COMMAND_FIELDS[command]
  if command == 'erase' and _get(config, 'evaluate.classifier') not in ('', _MISSING):
    fields += _MEASURE
  for field in dict.fromkeys(fields):
    _rule(config, field)
  for relation in RELATIONS.get(command, ()):
    relation(config)
