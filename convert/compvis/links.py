"""The key correspondence between CompVis (ldm) and diffusers/transformers state dicts, both directions.

One description, both directions. Each component is described by a list of `_Link`s built from its
config (or, for a file without our configs, from the CompVis keys themselves): a link pairs a module
prefix on each side (everything below it keeps its name), or an exact key on each side (with an array
transform per direction: 1×1 conv ⇄ linear, transpose), or three diffusers keys with the one CompVis key
they are fused into. `_convert` applies the same links either way, so the two directions cannot drift.

Key conventions of the per-component functions (the whole-file functions add/strip the prefixes):
  UNet:         CompVis keys without `model.diffusion_model.`;
  VAE:          CompVis keys without `first_stage_model.`;
  text encoder: CompVis keys without `cond_stage_model.` (so SD1 keys start `transformer.`, SD2 `model.`);
                transformers keys as SD checkpoints (and esd_jax.models.clip) spell them:
                `text_model.{embeddings,encoder,final_layer_norm}.*`, plus `text_projection.weight` for
                CLIPTextModelWithProjection. Keys without `text_model.` (as transformers 5 saves a
                CLIPTextModel it built itself) are accepted as input.
Values may be arrays or zero-argument callables returning one (lazy tensors); renames pass them through
untouched and transforms stay lazy, so a whole file is never held twice in memory.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from esd_jax.files import LazyTensor

UNET_PREFIX = 'model.diffusion_model.'
VAE_PREFIX = 'first_stage_model.'
TEXT_PREFIX = 'cond_stage_model.'

_DIFFUSERS, _COMPVIS = 0, 1


# ----------------------------------------------------------------------------------------------------
# The correspondence machinery.


@dataclass(frozen=True)
class _Op:
  """An array transform, with the shape it produces so that lazy results know theirs unread."""
  fn: Callable[..., np.ndarray]
  shape: Callable[..., tuple[int, ...]]


# [O, I, 1, 1] (or a legacy [O, I, 1]) ⇄ [O, I]; biases pass through. Indexed by destination side.
_CONV1X1 = (_Op(lambda a: a.reshape(a.shape[:2]) if a.ndim > 2 else a, lambda s: s[:2]),
            _Op(lambda a: a.reshape(*a.shape, 1, 1) if a.ndim == 2 else a,
                lambda s: (*s, 1, 1) if len(s) == 2 else s))
_TRANSPOSE = (_Op(lambda a: np.ascontiguousarray(a.T), lambda s: s[::-1]),) * 2
_CONCAT = _Op(lambda *parts: np.concatenate(parts, axis=0),
              lambda *shapes: (sum(s[0] for s in shapes), *shapes[0][1:]))


def _part(i: int, n: int) -> _Op:
  def take(a):
    if a.shape[0] % n:
      raise ValueError(f'cannot split a fused tensor of shape {a.shape} into {n} equal parts.')
    step = a.shape[0] // n
    return a[i * step:(i + 1) * step].copy()  # a copy, so the fused tensor is not kept alive by a view
  return _Op(take, lambda s: (s[0] // n, *s[1:]))


def _apply(op: _Op | None, *values):
  """op(*arrays), deferred (a LazyTensor) when any value is lazy; None with one value is the identity."""
  if op is None:
    (value,) = values
    return value
  if not any(callable(v) for v in values):
    return op.fn(*(np.asarray(v) for v in values))
  values = [LazyTensor.of(v) for v in values]
  shape = op.shape(*(tuple(v.shape) for v in values))
  return LazyTensor(lambda: op.fn(*(np.asarray(v) for v in values)), shape, values[0].dtype)


@dataclass(frozen=True)
class _Link:
  """One correspondence. `names[side]` holds one module prefix or exact key per side, or (fused) the
  exact diffusers keys whose concatenation along axis 0 is the one CompVis key. `into[side]` is the
  transform giving that side's layout (None: the same layout)."""
  names: tuple[tuple[str, ...], tuple[str, ...]]
  into: tuple[_Op | None, _Op | None] = (None, None)
  optional: bool = False


def _same(diffusers: str, compvis: str, *, into=(None, None), optional: bool = False) -> _Link:
  return _Link(((diffusers,), (compvis,)), into, optional)


def _fused(diffusers: tuple[str, ...], compvis: str) -> _Link:
  return _Link((diffusers, (compvis,)))


@dataclass(frozen=True)
class _Plan:
  links: list[_Link]
  # CompVis keys (relative to the component prefix) that our models do not hold and that are returned as
  # extras when reading; any other unmapped key is an error.
  passthrough: Callable[[str], bool] = lambda key: False


def _show(keys, n: int = 6) -> str:
  keys = sorted(keys)
  return ', '.join(keys[:n]) + (f' … ({len(keys)} in all)' if len(keys) > n else '')


def _convert(sd: Mapping[str, Any], plan: _Plan, dst: int, source: str) -> tuple[dict, dict]:
  """Renames/transforms `sd` (keys on side 1 - dst) to side `dst`. Returns (converted, passthrough)."""
  src = 1 - dst
  index = {name: link for link in plan.links for name in link.names[src]}
  out, extras, unknown, seen = {}, {}, [], set()
  gathered: dict[_Link, dict[str, Any]] = defaultdict(dict)

  def put(key, value):
    if key in out:
      raise ValueError(f'{source}: two tensors map to {key!r}; the checkpoint has duplicate entries.')
    out[key] = value

  for key, value in sd.items():
    parts = key.split('.')
    for n in range(len(parts), 0, -1):
      link = index.get('.'.join(parts[:n]))
      if link is not None:
        break
    if link is None:
      if dst == _DIFFUSERS and plan.passthrough(key):
        extras[key] = value
      else:
        unknown.append(key)
      continue
    seen.add(link)
    suffix = key[len('.'.join(parts[:n])):]
    sources, targets = link.names[src], link.names[dst]
    if len(sources) > 1:
      gathered[link][key] = value
    elif len(targets) > 1:
      for i, target in enumerate(targets):
        put(target + suffix, _apply(_part(i, len(targets)), value))
    else:
      put(targets[0] + suffix, _apply(link.into[dst], value))
  for link, parts in gathered.items():
    absent = [k for k in link.names[src] if k not in parts]
    if absent:
      raise KeyError(f'{source}: {", ".join(absent)} missing; it is needed to build {link.names[dst][0]}.')
    put(link.names[dst][0], _apply(_CONCAT, *(parts[k] for k in link.names[src])))

  side = 'CompVis' if src == _COMPVIS else 'diffusers'
  if unknown:
    raise KeyError(f'{source}: {len(unknown)} {side} key(s) have no counterpart in the model\'s layout: '
                   f'{_show(unknown)}. The weights and the config do not belong together, or the model is '
                   'not a supported Stable Diffusion 1/2 component.')
  missing = [link.names[src][0] for link in plan.links if link not in seen and not link.optional]
  if missing:
    raise KeyError(f'{source}: no {side} tensors for {_show(missing)}, which the config describes. The '
                   'weights and the config do not belong together.')
  return out, extras


def _indices(keys: Collection[str], prefix: str) -> list[int]:
  """Sorted distinct integers i of keys `prefix.i.…`."""
  found = set()
  for key in keys:
    if key.startswith(prefix + '.'):
      head = key[len(prefix) + 1:].split('.', 1)[0]
      if head.isdigit():
        found.add(int(head))
  return sorted(found)


# ----------------------------------------------------------------------------------------------------
# UNet.

# ldm ResBlock submodules ⇄ diffusers ResnetBlock2D.
_UNET_RESNET = (('norm1', 'in_layers.0'), ('conv1', 'in_layers.2'), ('time_emb_proj', 'emb_layers.1'),
                ('norm2', 'out_layers.0'), ('conv2', 'out_layers.3'), ('conv_shortcut', 'skip_connection'))
_DOWN_TYPES = {'CrossAttnDownBlock2D': True, 'DownBlock2D': False}  # → has attention
_UP_TYPES = {'CrossAttnUpBlock2D': True, 'UpBlock2D': False}


@dataclass(frozen=True)
class _UNetLayout:
  layers: tuple[int, ...]        # resnets per down block; up block i has layers[::-1][i] + 1
  down_attn: tuple[bool, ...]
  up_attn: tuple[bool, ...]      # in diffusers' up-block order (deepest first)
  label_emb: str | None = None   # diffusers module fed by ldm `label_emb.0` (an MLP)
  class_table: bool = False      # ldm `label_emb` is an Embedding (num_class_embeds)


def _unet_layout_of_config(config: Mapping[str, Any], source: str) -> _UNetLayout:
  down = list(config.get('down_block_types', ()))
  up = list(config.get('up_block_types', ()))
  bad = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
  if bad or len(down) != len(up) or not down:
    raise ValueError(f'{source}: the CompVis layout is mapped for UNets of {sorted(_DOWN_TYPES)} down and '
                     f'{sorted(_UP_TYPES)} up blocks (as many of each); this config has {down} / {up}.')
  if config.get('mid_block_type', 'UNetMidBlock2DCrossAttn') != 'UNetMidBlock2DCrossAttn':
    raise ValueError(f'{source}: only UNetMidBlock2DCrossAttn middle blocks are mapped to the CompVis '
                     f'layout, not {config.get("mid_block_type")!r}.')
  lpb = config.get('layers_per_block', 2)
  layers = (lpb,) * len(down) if isinstance(lpb, int) else tuple(lpb)
  label_emb = ('add_embedding' if config.get('addition_embed_type') == 'text_time' else
               'class_embedding' if config.get('class_embed_type') in ('projection', 'timestep') else None)
  return _UNetLayout(layers, tuple(_DOWN_TYPES[t] for t in down), tuple(_UP_TYPES[t] for t in up), label_emb,
                     config.get('num_class_embeds') is not None)


def _unet_layout_of_keys(keys: Collection[str]) -> _UNetLayout:
  """The layout a CompVis UNet's keys show: blocks end at a downsampler (`input_blocks.k.0.op`)."""
  keys = set(keys)
  layers, down_attn, count, attn = [], [], 0, False
  for k in _indices(keys, 'input_blocks')[1:]:
    if f'input_blocks.{k}.0.op.weight' in keys:
      layers.append(count)
      down_attn.append(attn)
      count, attn = 0, False
    else:
      attn = attn or f'input_blocks.{k}.1.proj_in.weight' in keys
      count += 1
  layers.append(count)
  down_attn.append(attn)
  up_attn, k = [], 0
  for num in reversed(layers):
    up_attn.append(f'output_blocks.{k}.1.proj_in.weight' in keys)
    k += num + 1
  # ldm's label_emb.0 MLP is SDXL's add_embedding (class embeddings of this form are rare).
  label_emb = 'add_embedding' if 'label_emb.0.0.weight' in keys else None
  return _UNetLayout(tuple(layers), tuple(down_attn), tuple(up_attn), label_emb, 'label_emb.weight' in keys)


def _unet_resnet(diffusers: str, compvis: str) -> list[_Link]:
  return [_same(f'{diffusers}.{d}', f'{compvis}.{c}', optional=d == 'conv_shortcut') for d, c in _UNET_RESNET]


def _unet_plan(config: Mapping[str, Any] | None, compvis_keys: Collection[str] | None, source: str) -> _Plan:
  lay = _unet_layout_of_config(config, source) if config is not None else _unet_layout_of_keys(compvis_keys)
  links = [_same('time_embedding.linear_1', 'time_embed.0'), _same('time_embedding.linear_2', 'time_embed.2'),
           _same('conv_in', 'input_blocks.0.0'), _same('conv_norm_out', 'out.0'), _same('conv_out', 'out.2')]
  if lay.label_emb:
    links += [_same(f'{lay.label_emb}.linear_1', 'label_emb.0.0'),
              _same(f'{lay.label_emb}.linear_2', 'label_emb.0.2')]
  if lay.class_table:
    links.append(_same('class_embedding', 'label_emb'))
  n, k = len(lay.layers), 1
  for i in range(n):
    for j in range(lay.layers[i]):
      links += _unet_resnet(f'down_blocks.{i}.resnets.{j}', f'input_blocks.{k}.0')
      if lay.down_attn[i]:
        links.append(_same(f'down_blocks.{i}.attentions.{j}', f'input_blocks.{k}.1'))
      k += 1
    if i < n - 1:
      links.append(_same(f'down_blocks.{i}.downsamplers.0.conv', f'input_blocks.{k}.0.op'))
      k += 1
  links += _unet_resnet('mid_block.resnets.0', 'middle_block.0')
  links.append(_same('mid_block.attentions.0', 'middle_block.1'))
  links += _unet_resnet('mid_block.resnets.1', 'middle_block.2')
  k = 0
  for i, (num, attn) in enumerate(zip(reversed(lay.layers), lay.up_attn)):
    for j in range(num + 1):
      links += _unet_resnet(f'up_blocks.{i}.resnets.{j}', f'output_blocks.{k}.0')
      if attn:
        links.append(_same(f'up_blocks.{i}.attentions.{j}', f'output_blocks.{k}.1'))
      if j == num and i < n - 1:  # ldm appends the upsampler after the block's last resnet (+ attention)
        links.append(_same(f'up_blocks.{i}.upsamplers.0.conv', f'output_blocks.{k}.{2 if attn else 1}.conv'))
      k += 1
  return _Plan(links)


# ----------------------------------------------------------------------------------------------------
# VAE.

_VAE_ATTENTION = (('group_norm', 'norm', (None, None)), ('to_q', 'q', _CONV1X1), ('to_k', 'k', _CONV1X1),
                  ('to_v', 'v', _CONV1X1), ('to_out.0', 'proj_out', _CONV1X1))


@dataclass(frozen=True)
class _VAELayout:
  blocks: int
  layers: int                   # resnets per encoder block; decoder blocks have one more
  mid_attn: bool = True
  quant_conv: bool = True
  post_quant_conv: bool = True


def _vae_layout_of_config(config: Mapping[str, Any], source: str) -> _VAELayout:
  down, up = list(config.get('down_block_types', ())), list(config.get('up_block_types', ()))
  if set(down) != {'DownEncoderBlock2D'} or set(up) != {'UpDecoderBlock2D'} or len(down) != len(up):
    raise ValueError(f'{source}: the CompVis layout is mapped for AutoencoderKL with DownEncoderBlock2D/'
                     f'UpDecoderBlock2D blocks; this config has {down} / {up}.')
  return _VAELayout(len(down), config.get('layers_per_block', 1), config.get('mid_block_add_attention', True),
                    config.get('use_quant_conv', True), config.get('use_post_quant_conv', True))


def _vae_layout_of_keys(keys: Collection[str]) -> _VAELayout:
  keys = set(keys)
  return _VAELayout(len(_indices(keys, 'encoder.down')), len(_indices(keys, 'encoder.down.0.block')),
                    'encoder.mid.attn_1.q.weight' in keys, 'quant_conv.weight' in keys,
                    'post_quant_conv.weight' in keys)


def _vae_resnet(diffusers: str, compvis: str) -> list[_Link]:
  return [_same(diffusers, compvis),
          _same(f'{diffusers}.conv_shortcut', f'{compvis}.nin_shortcut', optional=True)]


def _vae_plan(config: Mapping[str, Any] | None, compvis_keys: Collection[str] | None, source: str) -> _Plan:
  lay = _vae_layout_of_config(config, source) if config is not None else _vae_layout_of_keys(compvis_keys)
  links = []
  for part in ('encoder', 'decoder'):
    links += [_same(f'{part}.conv_in', f'{part}.conv_in'), _same(f'{part}.conv_out', f'{part}.conv_out'),
              _same(f'{part}.conv_norm_out', f'{part}.norm_out')]
    for r in range(2):
      links += _vae_resnet(f'{part}.mid_block.resnets.{r}', f'{part}.mid.block_{r + 1}')
    if lay.mid_attn:
      links += [_same(f'{part}.mid_block.attentions.0.{d}', f'{part}.mid.attn_1.{c}', into=into)
                for d, c, into in _VAE_ATTENTION]
  for i in range(lay.blocks):
    for j in range(lay.layers):
      links += _vae_resnet(f'encoder.down_blocks.{i}.resnets.{j}', f'encoder.down.{i}.block.{j}')
    if i < lay.blocks - 1:
      links.append(_same(f'encoder.down_blocks.{i}.downsamplers.0.conv', f'encoder.down.{i}.downsample.conv'))
  for i in range(lay.blocks):
    level = lay.blocks - 1 - i  # ldm numbers decoder levels by resolution, diffusers by execution order
    for j in range(lay.layers + 1):
      links += _vae_resnet(f'decoder.up_blocks.{i}.resnets.{j}', f'decoder.up.{level}.block.{j}')
    if i < lay.blocks - 1:
      links.append(_same(f'decoder.up_blocks.{i}.upsamplers.0.conv', f'decoder.up.{level}.upsample.conv'))
  links += [_same(name, name) for name, present in (('quant_conv', lay.quant_conv),
                                                    ('post_quant_conv', lay.post_quant_conv)) if present]
  return _Plan(links)


# ----------------------------------------------------------------------------------------------------
# Text encoder.

_CLIP_ROOT = 'transformer.text_model.'
_OPEN_CLIP_LAYER = (('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'), ('self_attn.out_proj', 'attn.out_proj'),
                    ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj'))
_RESBLOCK = re.compile(r'model\.transformer\.resblocks\.(\d+)\.')


@dataclass(frozen=True)
class _TextLayout:
  open_clip: bool     # SD2's OpenCLIP (`model.*`, fused q/k/v) rather than SD1's OpenAI CLIP
  layers: int         # transformer layers our model has
  projection: bool    # CLIPTextModelWithProjection: map OpenCLIP's text_projection (transposed)


def _text_layout_of_config(config: Mapping[str, Any]) -> _TextLayout:
  # OpenCLIP text towers use GELU, OpenAI's CLIP uses QuickGELU: the activation tells the two layouts apart.
  return _TextLayout(config.get('hidden_act', 'quick_gelu') == 'gelu', config.get('num_hidden_layers', 12),
                     'CLIPTextModelWithProjection' in (config.get('architectures') or ()))


def _text_layout_of_keys(keys: Collection[str]) -> _TextLayout:
  if any(k.startswith('model.') for k in keys):
    # SD2 conditions on OpenCLIP's penultimate layer: like diffusers, the model drops the last one of a
    # complete tower (as Stability ships it, with text_projection). Files converted from diffusers hold
    # only the layers diffusers has, and no projection: all of theirs are kept.
    layers = len(_indices(keys, 'model.transformer.resblocks'))
    return _TextLayout(True, max(layers - ('model.text_projection' in keys), 0), False)
  return _TextLayout(False, len(_indices(keys, _CLIP_ROOT + 'encoder.layers')), False)


def _text_plan(config: Mapping[str, Any] | None, compvis_keys: Collection[str] | None, source: str) -> _Plan:
  lay = _text_layout_of_config(config) if config is not None else _text_layout_of_keys(compvis_keys)
  if not lay.open_clip:
    if lay.projection:
      raise ValueError(f'{source}: SD1 checkpoints hold no text projection; use a CLIPTextModel config.')
    links = [_same(f'text_model.embeddings.{e}', f'{_CLIP_ROOT}embeddings.{e}')
             for e in ('token_embedding', 'position_embedding')]
    links += [_same(f'text_model.encoder.layers.{i}', f'{_CLIP_ROOT}encoder.layers.{i}')
              for i in range(lay.layers)]
    links.append(_same('text_model.final_layer_norm', f'{_CLIP_ROOT}final_layer_norm'))
    return _Plan(links, lambda key: key == f'{_CLIP_ROOT}embeddings.position_ids')
  links = [_same('text_model.embeddings.token_embedding', 'model.token_embedding'),
           _same('text_model.embeddings.position_embedding.weight', 'model.positional_embedding'),
           _same('text_model.final_layer_norm', 'model.ln_final')]
  for i in range(lay.layers):
    ours, theirs = f'text_model.encoder.layers.{i}', f'model.transformer.resblocks.{i}'
    links += [_same(f'{ours}.{d}', f'{theirs}.{c}') for d, c in _OPEN_CLIP_LAYER]
    links += [_fused(tuple(f'{ours}.self_attn.{p}_proj.{w}' for p in 'qkv'), f'{theirs}.attn.in_proj_{w}')
              for w in ('weight', 'bias')]
  if lay.projection:
    links.append(_same('text_projection.weight', 'model.text_projection', into=_TRANSPOSE))

  def passthrough(key):
    m = _RESBLOCK.match(key)
    return key in ('model.text_projection', 'model.logit_scale') or bool(m and int(m[1]) >= lay.layers)
  return _Plan(links, passthrough)


def _text_diffusers_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
  return {k if k.startswith(('text_model.', 'text_projection.')) else 'text_model.' + k: v
          for k, v in sd.items()}


def _text_compvis_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Older SD1 files lack `text_model.` below `transformer.`; read them as the current layout."""
  if any(k.startswith(_CLIP_ROOT) for k in sd):
    return dict(sd)
  return {_CLIP_ROOT + k.removeprefix('transformer.') if k.startswith('transformer.') else k: v
          for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------
# Per-component API.


@dataclass(frozen=True)
class _Component:
  prefix: str
  plan: Callable[[Mapping | None, Collection[str] | None, str], _Plan]
  diffusers_keys: Callable[[Mapping], dict] = dict
  compvis_keys: Callable[[Mapping], dict] = dict


_COMPONENTS = {
    'unet': _Component(UNET_PREFIX, _unet_plan),
    'vae': _Component(VAE_PREFIX, _vae_plan),
    'text_encoder': _Component(TEXT_PREFIX, _text_plan, _text_diffusers_keys, _text_compvis_keys),
}


def _to_compvis(name: str, sd: Mapping[str, Any], config: Mapping[str, Any], source: str) -> dict[str, Any]:
  component = _COMPONENTS[name]
  return _convert(component.diffusers_keys(sd), component.plan(config, None, source), _COMPVIS, source)[0]


def _from_compvis(name: str, sd: Mapping[str, Any], config: Mapping[str, Any] | None,
                  source: str) -> tuple[dict[str, Any], dict[str, Any]]:
  component = _COMPONENTS[name]
  sd = component.compvis_keys(sd)
  return _convert(sd, component.plan(config, sd.keys(), source), _DIFFUSERS, source)


def unet_to_compvis(sd: Mapping[str, Any], unet_config: Mapping[str, Any], *, source: str = 'UNet') -> dict:
  """diffusers UNet2DConditionModel keys → CompVis keys (without `model.diffusion_model.`)."""
  return _to_compvis('unet', sd, unet_config, source)


def unet_from_compvis(sd: Mapping[str, Any], unet_config: Mapping[str, Any] | None = None, *,
                      source: str = 'UNet') -> dict:
  """CompVis UNet keys (without `model.diffusion_model.`) → diffusers keys.

  With `unet_config` None the block structure is read off the keys. Unknown keys are errors.
  """
  return _from_compvis('unet', sd, unet_config, source)[0]


def vae_to_compvis(sd: Mapping[str, Any], vae_config: Mapping[str, Any], *, source: str = 'VAE') -> dict:
  """diffusers AutoencoderKL keys → CompVis keys (without `first_stage_model.`); attention Linear → 1×1
  conv."""
  return _to_compvis('vae', sd, vae_config, source)


def vae_from_compvis(sd: Mapping[str, Any], vae_config: Mapping[str, Any] | None = None, *,
                     source: str = 'VAE') -> dict:
  """CompVis VAE keys (without `first_stage_model.`) → diffusers keys; attention 1×1 conv → Linear."""
  return _from_compvis('vae', sd, vae_config, source)[0]


def text_encoder_to_compvis(sd: Mapping[str, Any], text_config: Mapping[str, Any], *,
                            source: str = 'text encoder') -> dict:
  """transformers CLIPTextModel(WithProjection) keys → CompVis keys (without `cond_stage_model.`).

  `hidden_act` picks the layout: 'gelu' → SD2 OpenCLIP (`model.*`, fused q/k/v), else SD1 CLIP
  (`transformer.text_model.*`).
  """
  return _to_compvis('text_encoder', sd, text_config, source)


def text_encoder_from_compvis(sd: Mapping[str, Any], text_config: Mapping[str, Any] | None = None, *,
                              source: str = 'text encoder') -> tuple[dict, dict]:
  """CompVis text-encoder keys (without `cond_stage_model.`) → (transformers keys, extras).

  extras are the CompVis tensors our model does not hold (see the `convert.compvis` docstring), keyed in the
  current CompVis layout (older SD1 keys without `text_model.` are read as the current ones).
  """
  return _from_compvis('text_encoder', sd, text_config, source)

