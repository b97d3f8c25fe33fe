"""esd_jax.validate: every shipped config passes for its commands; each bad field is refused, by name, before any
model loads (these tests load none)."""

import importlib
import math
import re

import ml_collections
import pytest

from esd_jax import validate
from esd_jax.validate import ConfigError, check

USER_COMMANDS = ('erase', 'generate', 'export', 'compare', 'evaluate', 'dry_run', 'serve')
CONFIGS = ('default', 'sd14_esd_x', 'sd14_esd_u', 'sd14_diffusers_v1', 'sd14_diffusers_v2', 'shapes_colour',
           'shapes_colour:blue', 'shapes_four_models', 'any_concept')


def load(name: str) -> ml_collections.ConfigDict:
  """configs/NAME.py's get_config(), or get_config(ARG) for NAME:ARG (as `--config=configs/NAME.py:ARG`)."""
  module, _, arg = name.partition(':')
  get_config = importlib.import_module(f'configs.{module}').get_config
  return get_config(arg) if arg else get_config()


def with_fields(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of `config` with fields set: section__field=value (any type, as a config file could)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for name, value in fields.items():
    *sections, last = name.split('__')
    node = config
    for section in sections:
      node = node[section]
    with config.ignore_type():
      node[last] = value
  return config


@pytest.mark.parametrize('command', USER_COMMANDS)
@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_pass(name, command):
  config = load(name)
  if command == 'evaluate' and not config.evaluate.classifier:
    # The SD 1.4 configs measure nothing (the shapes classifier knows the shapes world only); `evaluate` needs a
    # classifier, so it is refused up front, naming the field, and passes once one is given.
    with pytest.raises(ConfigError, match=re.escape("--config.evaluate.classifier=''")):
      check(config, command)
    config = with_fields(config, evaluate__classifier='shapes-world')
  check(config, command)


def test_train_world_config_passes():
  config = load('train_world')
  check(config, 'train_world')
  with pytest.raises(ConfigError, match=re.escape('--config.world.unet_steps=0')):
    check(with_fields(config, world__unet_steps=0), 'train_world')
  with pytest.raises(ConfigError, match=re.escape('--config.world.lr: no such field')):
    check(with_fields(config, world__lr=1e-3), 'train_world')
  with pytest.raises(ConfigError, match=re.escape("--config.output=''")):
    check(with_fields(config, output=''), 'train_world')


NAN, INF = math.nan, math.inf
# (command, field (section__field), bad value, a piece of the text of what is valid)
FAULTS = [
    ('erase', 'train__iterations', 0, '≥ 1'),
    ('erase', 'train__iterations', -5, '≥ 1'),
    ('erase', 'train__iterations', 2.5, 'whole number'),
    ('erase', 'train__learning_rate', 0.0, '> 0'),
    ('erase', 'train__learning_rate', -1e-5, '> 0'),
    ('erase', 'train__learning_rate', NAN, 'finite'),
    ('erase', 'train__learning_rate', INF, 'finite'),
    ('erase', 'erase__negative_guidance', -1.0, '≥ 0'),
    ('erase', 'erase__negative_guidance', NAN, 'finite'),
    ('erase', 'erase__guidance', -0.5, '≥ 0'),
    ('erase', 'train__checkpoint_every', 0, '≥ 1'),
    ('erase', 'checkpoint__keep', 0, '≥ 1'),
    ('erase', 'export__formats', ('diffusers', 'onnx'), "'single_file'"),
    ('erase', 'export__formats', (), 'non-empty'),
    ('erase', 'export__formats', 'diffusers', 'list'),
    ('erase', 'export__dtype', 'int8', "'fp16'"),
    ('export', 'export__formats', ('onnx',), "'trained'"),
    ('export', 'export__dtype', 'fp8', "'bf16'"),
    ('erase', 'erase__method', 'esd-z', "'esd-x'"),
    ('dry_run', 'erase__method', 'esd-z', "'patterns'"),
    ('erase', 'erase__convention', 'diffusers-v3', "'diffusers-v2'"),
    ('erase', 'erase__sampler', 'euler', "'pndm'"),
    ('erase', 'erase__ddim_steps', 1, '≥ 2'),
    ('erase', 'erase__resolution', -8, 'multiple of 8'),
    ('erase', 'erase__resolution', 100, 'multiple of 8'),
    ('erase', 'train__batch_size', 0, '≥ 1'),
    ('erase', 'train__concepts_per_step', 0, '≥ 1'),
    ('erase', 'train__compute_dtype', 'float16', "'bfloat16'"),
    ('erase', 'train__seed', -1, '≥ 0'),
    ('erase', 'mesh__data', 0, '-1'),
    ('erase', 'mesh__fsdp', -2, '-1'),
    ('erase', 'mesh__concept', 0, '≥ 1'),
    ('erase', 'mesh__concept', -1, '≥ 1'),
    ('erase', 'mesh__min_shard_size', -1, '≥ 0'),
    ('erase', 'model', '', 'non-empty'),
    ('erase', 'workdir', '', 'non-empty'),
    ('erase', 'workdir', None, 'string'),
    ('erase', 'prediction_type', 'eps', "'v_prediction'"),
    ('erase', 'erase__separate_models', 'yes', 'True or False'),
    ('generate', 'generate__dtype', 'float16', "'float32'"),
    ('generate', 'generate__steps', 0, '≥ 1'),
    ('generate', 'generate__seeds', (), 'non-empty'),
    ('generate', 'generate__seeds', (0, 1.5), 'whole numbers'),
    ('generate', 'generate__prompts', (), 'non-empty'),
    ('generate', 'generate__prompts', 'a cat', 'list'),
    ('generate', 'generate__guidance_scale', -1.0, '≥ 0'),
    ('generate', 'generate__scheduler', 'euler', "'config'"),
    ('generate', 'generate__eta', 2.0, '≤ 1'),
    ('generate', 'generate__height', 100, 'multiple of 8'),
    ('generate', 'generate__width', -8, 'multiple of 8'),
    ('generate', 'model', '', 'non-empty'),
    ('compare', 'generate__seeds', (), 'non-empty'),
    ('compare', 'generate__width', 12, 'multiple of 8'),
    ('evaluate', 'evaluate__seeds', 0, '≥ 1'),
    ('evaluate', 'evaluate__prompts', (), 'non-empty'),
    ('evaluate', 'evaluate__backend', 'torch', "'diffusers'"),
    ('evaluate', 'evaluate__batch_size', 0, '≥ 1'),
    ('evaluate', 'evaluate__grid_seeds', -1, '≥ 0'),
    ('evaluate', 'evaluate__steps', 0, '≥ 1'),
    ('erase', 'evaluate__seeds', 0, '≥ 1'),  # erase measures with the classifier the default config names
    ('dry_run', 'model', '', 'non-empty'),
    ('serve', 'serve__port', 0, '≥ 1'),
    ('serve', 'serve__port', 65536, '≤ 65535'),
    ('serve', 'serve__port', '7860', 'whole number'),
    ('serve', 'serve__host', '', 'non-empty'),
    ('serve', 'serve__max_upload_mb', 0, '≥ 1'),
    ('serve', 'model', '', 'non-empty'),
]


@pytest.mark.parametrize('command,field,value,valid', FAULTS,
                         ids=[f'{c}-{f.replace("__", ".")}={v!r}' for c, f, v, _ in FAULTS])
def test_fault_is_refused_naming_its_field(command, field, value, valid):
  config = with_fields(load('default'), **{field: value})
  with pytest.raises(ConfigError) as raised:
    check(config, command)
  message = str(raised.value)
  assert message.startswith(f'--config.{field.replace("__", ".")}={value!r} ')
  assert valid in message


# Faults between fields: (command, fields, the field named, a piece of the message)
RELATED = [
    ('erase', dict(erase__sampler='pndm'), 'erase.sampler', 'diffusers-v2'),
    ('erase', dict(erase__sampler='pndm', erase__convention='diffusers-v1'), 'erase.sampler', 'diffusers-v2'),
    ('erase', dict(mesh__data=-1, mesh__fsdp=-1), 'mesh.fsdp', 'at most one'),
    ('erase', dict(erase__method='patterns'), 'erase.patterns', 'non-empty'),
    ('dry_run', dict(erase__method='patterns', erase__patterns=('attn2[',)), 'erase.patterns', 'attn2['),
    ('erase', dict(erase__separate_models=True, train__concepts_per_step=2), 'train.concepts_per_step',
     'separate_models'),
    ('erase', dict(train__shared_timesteps=True), 'train.shared_timesteps', 'separate_models'),
    ('erase', dict(erase__concepts=('circle', ' ')), 'erase.concepts', 'non-empty prompt'),
    ('erase', dict(erase__concepts=('circle', 'square'), erase__erase_from=('a',)), 'erase.erase_from', '1 entries'),
    ('erase', dict(erase__concepts_file='/no/such/concepts.csv'), 'erase.concepts_file', 'no such concepts file'),
    ('evaluate', dict(evaluate__classifier=''), 'evaluate.classifier', 'classifier'),
    ('evaluate', dict(evaluate__backend='diffusers', export__weights=__file__), 'export.weights', 'diffusers'),
    ('erase', dict(evaluate__classifier='/no/such/classifier'), 'evaluate.classifier', 'config.json'),
    ('evaluate', dict(evaluate__classifier='/no/such/classifier'), 'evaluate.classifier', 'config.json'),
    ('evaluate', dict(export__weights='/no/such/w.safetensors'), 'export.weights', 'no file'),
    ('export', dict(export__weights='/no/such/w.safetensors'), 'export.weights', 'no file'),
    ('compare', dict(export__weights='/no/such/w.pt'), 'export.weights', 'no file'),
    ('serve', dict(mesh__distributed=True), 'mesh.distributed', 'one process'),
    ('attack', dict(attack__sample_steps=2), 'attack.handoff', 'DDIM steps ≤ --config.attack.sample_steps=2'),
]


@pytest.mark.parametrize('command,fields,named,text', RELATED, ids=[f'{c}-{n}' for c, _, n, _ in RELATED])
def test_related_fields_are_refused(command, fields, named, text):
  with pytest.raises(ConfigError) as raised:
    check(with_fields(load('default'), **fields), command)
  assert str(raised.value).startswith(f'--config.{named}=')
  assert text in str(raised.value)


def test_related_fields_that_agree_pass(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'w.safetensors').write_bytes(b'')
  check(with_fields(load('default'), evaluate__classifier=str(tmp_path)), 'erase')
  for command in ('evaluate', 'export', 'compare'):
    check(with_fields(load('default'), export__weights=str(tmp_path / 'w.safetensors')), command)
  check(with_fields(load('default'), erase__method='patterns', erase__patterns=('attn2',)), 'erase')
  check(with_fields(load('default'), mesh__data=2, mesh__fsdp=-1), 'erase')
  check(with_fields(load('default'), erase__separate_models=True, train__shared_timesteps=True), 'erase')
  # Without a judge no probe runs: the handoff steps are not checked against the sampler's.
  check(with_fields(load('default'), attack__sample_steps=2, attack__classifier='', attack__objective='denoise'),
        'attack')


def test_bad_concepts_file_is_refused_with_its_line(tmp_path):
  path = tmp_path / 'c.csv'
  path.write_text('concept,negative_guidance\ncat,2\ndog,lots\n')
  with pytest.raises(ConfigError, match=re.escape(f"--config.erase.concepts_file='{path}' is not valid: "
                                                  f"{path} line 3: negative_guidance 'lots'")):
    check(with_fields(load('default'), erase__concepts_file=str(path)), 'erase')


def test_only_the_commands_fields_are_checked():
  config = with_fields(load('default'), train__iterations=0, export__dtype='int8', erase__method='nope',
                       mesh__data=0, evaluate__seeds=0)
  check(config, 'generate')  # generate reads none of them
  check(with_fields(load('default'), generate__seeds=(), evaluate__seeds=0), 'export')
  # erase measures (and so checks evaluate.*) only with a classifier; evaluate.backend is evaluate's alone
  check(with_fields(load('default'), evaluate__classifier='', evaluate__seeds=0), 'erase')
  check(with_fields(load('default'), evaluate__backend='torch'), 'erase')


def test_absent_sections_do_not_crash():
  check(load('train_world'), 'train_world')
  config = load('default')
  del config['evaluate']
  del config['checkpoint']
  check(config, 'erase')
  check(ml_collections.ConfigDict({'model': 'shapes-world'}), 'erase')
  check(ml_collections.ConfigDict(), 'train_world')


def test_unknown_command():
  with pytest.raises(ConfigError, match="Unknown command 'train'"):
    check(load('default'), 'train')


def test_every_rule_is_read_by_a_command_and_every_default_field_has_a_rule():
  read = {f for fields in validate.COMMAND_FIELDS.values() for f in fields} | set(validate._MEASURE)
  assert set(validate.RULES) <= read
  default = load('default')
  fields = {f'{s}.{k}' if isinstance(section, dict) else s
            for s, section in default.to_dict().items() for k in (section if isinstance(section, dict) else [s])}
  # erase.concepts, erase_from and concepts_file are checked by reading the concept list (concepts.of_config)
  unchecked = fields - set(validate.RULES) - {'erase.concepts', 'erase.erase_from', 'erase.concepts_file'}
  assert not unchecked


def test_config_error_is_a_value_error():
  assert issubclass(ConfigError, ValueError)
