"""The app's forms as configs: each form's values laid over the server's config and checked by esd_jax.validate, so
a bad field is refused with the command line's own message (`--config.train.iterations=0 is not valid: …`).

The page never builds a config any other way: what the Erase form starts is what `python main.py erase` with the
same fields would run, and its JSON (workdir/runs/NAME/app_config.json) is what Resume runs again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import ml_collections

from esd_jax import validate
from esd_jax.methods import ALIASES, method_names

# What each train method trains, in a line (docs/method.md §3 has the tensor counts).
METHOD_HELP = {
    'esd-x': 'cross-attention (attn2) only: erases what a prompt word brings in; the paper\'s choice for styles',
    'esd-u': 'everything but cross-attention and the time / output layers: erases a concept from every prompt '
             '(nudity, objects)',
    'esd-x-strict': 'only the cross-attention keys and values (attn2.to_k, to_v): the narrowest ESD-x',
    'esd-self': 'self-attention (attn1) only',
    'esd-all': 'every UNet tensor',
    'notime': 'every tensor except the time embedding and the output layers',
    'xlayer': 'cross-attention of two layers of the last up block only',
    'selflayer': 'self-attention of two layers of the down blocks only',
    'patterns': 'the tensors whose names match erase.patterns (regular expressions; set them in the server\'s '
                'config)',
}
METHOD_HELP.update({alias: f'the CompVis name of {name}: {METHOD_HELP[name]}' for alias, name in ALIASES.items()})


def method_choices() -> list[tuple[str, str]]:
  """(label, value) for every method the command line takes, each label with what the method trains."""
  return [(f'{m} — {METHOD_HELP.get(m, "")}', m) for m in method_names() + ['patterns']]


def lines(text: str | None) -> tuple[str, ...]:
  """The non-empty lines of a text box, stripped: one prompt or concept a line."""
  return tuple(line.strip() for line in (text or '').splitlines() if line.strip())


def whole_numbers(text: str | None) -> tuple:
  """'0, 1 2' → (0, 1, 2); what is not a whole number stays text, for the validator to name."""
  parts = [p for p in re.split(r'[,\s]+', text or '') if p]
  return tuple(int(p) if re.fullmatch(r'[+-]?\d+', p) else p for p in parts)


def copy_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def _set(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """`config` with dotted fields set to any value (a form may send None or a text): the validator judges them."""
  with config.ignore_type():
    for field, value in values.items():
      *sections, last = field.split('.')
      node = config
      for section in sections:
        node = node[section]
      node[last] = value
  return config


def erase_config(base: ml_collections.ConfigDict, workdir: str | Path, *, concepts: str, erase_from: str,
                 method: str, negative_guidance, iterations, learning_rate, convention: str, separate_models: bool,
                 seed, checkpoint_every, formats, export_dtype: str, measure: bool,
                 measure_seeds) -> ml_collections.ConfigDict:
  """The erase config of the Erase form, checked as `erase` checks it (validate.ConfigError names the field).

  The `trained` format is always written: the app lists and tests a run's erased models by that file."""
  config = copy_of(base)
  classifier = (base.evaluate.classifier or 'shapes-world') if measure else ''
  formats = tuple(dict.fromkeys([*(formats or ()), 'trained']))
  _set(config, {
      'workdir': str(workdir), 'erase.concepts': lines(concepts), 'erase.erase_from': (erase_from or '').strip(),
      'erase.concepts_file': '', 'erase.method': (method or '').strip(), 'erase.negative_guidance': negative_guidance,
      'erase.convention': convention, 'erase.separate_models': bool(separate_models),
      'train.iterations': iterations, 'train.learning_rate': learning_rate, 'train.seed': seed,
      'train.checkpoint_every': checkpoint_every, 'export.formats': formats, 'export.dtype': export_dtype,
      'evaluate.classifier': classifier, 'evaluate.seeds': measure_seeds if measure else base.evaluate.seeds})
  validate.check(config, 'erase')
  return config


def compare_settings(base: ml_collections.ConfigDict, *, prompts: str, seeds: str, guidance_scale,
                     steps) -> ml_collections.ConfigDict:
  """The Test form as a generate section, checked as `compare` checks it."""
  config = _set(copy_of(base), {'generate.prompts': lines(prompts), 'generate.seeds': whole_numbers(seeds),
                                'generate.guidance_scale': guidance_scale, 'generate.steps': steps,
                                'export.weights': ''})
  validate.check(config, 'compare')
  return config.generate


def export_config(base: ml_collections.ConfigDict, workdir: str | Path, *, weights: str | Path, fmt: str,
                  dtype: str) -> ml_collections.ConfigDict:
  """The config of `export` for one erased model (its ESD weights file) in one format and dtype."""
  config = _set(copy_of(base), {'workdir': str(workdir), 'export.weights': str(weights), 'export.formats': (fmt,),
                                'export.dtype': dtype})
  validate.check(config, 'export')
  return config
