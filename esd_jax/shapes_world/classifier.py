"""A small CNN that names the shape and the colour of a shapes-world image: the judge of generations.

It measures what a text-to-image model draws before and after an erasure, so it must stay right on
imperfect images: it trains on freshly drawn images (never the same batch twice) degraded on the fly by a
random gaussian blur, colour jitter and pixel noise, with shapes somewhat smaller, larger and further out
than the world allows (a generation that draws a square too big is still a square). It is saved as a
folder with `config.json` and `model.safetensors`.

And it must not flatter an erasure: with `reject: true` in its config (the shipped judge) each head has one
more answer, 'none' ("no recognisable shape", "no clear colour"), learnt from unrecognisable.py's images of
what erased models draw (fragments, blobs, bent and broken shapes, smears, blotched, blended and grey
colours), a third of every training batch. A config without the field loads as before: four answers each.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esd_jax.files import SafetensorsReader, atomic_path, write_json, write_safetensors
from esd_jax.shapes_world import unrecognisable, world
from esd_jax.shapes_world.fit import fit
from esd_jax.models.config import read_config
from esd_jax.models.layers import Conv2d, GroupNorm, Linear, ParamKeys
from esd_jax.models.state_dict import abstract, load_state_dict, state_dict

CLASS_NAME = 'ShapesClassifier'
_DEFAULTS = {'_class_name': CLASS_NAME, 'block_out_channels': (16, 32, 64, 64), 'hidden': 64,
             'norm_num_groups': 8, 'reject': False}
_SUPPORTED = {'_class_name': [CLASS_NAME],
              'block_out_channels': lambda c: len(c) >= 1 and all(int(x) > 0 for x in c),
              'reject': [False, True]}
JUDGE = {'reject': True}  # what train_classifier trains by default: the shipped judge's config

# What predict's ids name: the world's shapes and colours, then 'none' (only from a judge with reject: true).
SHAPE_LABELS = (*world.SHAPES, 'none')
COLOUR_LABELS = (*world.COLOUR_NAMES, 'none')

# Training-time layouts: sides and positions beyond the world's 24…44 px and 4…59 px box.
TRAIN_SIDES = (16, 52)
EVAL_SEED = 2_000_003  # held-out images: a seed no training run in this project uses
# Training defaults: per batch, world drawings and (a third of the batch) unrecognisable images.
BATCH_SIZE, UNRECOGNISABLE_N, LEARNING_RATE = 64, 32, 3e-3


class ShapesClassifier(nnx.Module):
  """Stride-2 conv blocks (conv → GroupNorm → SiLU), mean- and max-pooled, then a shared hidden layer and
  two heads: `shape_head` (logits over world.SHAPES) and `colour_head` (logits over world.COLOURS), each
  with a last logit for 'none' when the config says `reject` (SHAPE_LABELS, COLOUR_LABELS).

  Takes NHWC float images in [0, 1].
  """

  def __init__(self, config: Mapping[str, Any], *, rngs: nnx.Rngs, source: str = 'config.json'):
    self.config = read_config(CLASS_NAME, config, _DEFAULTS, _SUPPORTED, source=source)
    rngs = ParamKeys(rngs)
    c = self.config
    widths = [3, *c['block_out_channels']]
    self.convs = nnx.List([Conv2d(a, b, 3, stride=2, padding=1, rngs=rngs)
                           for a, b in zip(widths, widths[1:])])
    self.norms = nnx.List([GroupNorm(c['norm_num_groups'], b) for b in widths[1:]])
    self.hidden = Linear(2 * widths[-1], c['hidden'], rngs=rngs)
    self.shape_head = Linear(c['hidden'], len(world.SHAPES) + c['reject'], rngs=rngs)
    self.colour_head = Linear(c['hidden'], len(world.COLOURS) + c['reject'], rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(shape logits, colour logits) of float images in [0, 1]."""
    x = images * 2 - 1
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.silu(norm(conv(x)))
    # Mean and max pooling: the features say what is drawn, wherever it is.
    h = jax.nn.silu(self.hidden(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)))
    return self.shape_head(h), self.colour_head(h)


def build_classifier(config: Mapping[str, Any] | None = None, *, seed: int = 0) -> ShapesClassifier:
  """A randomly initialised classifier."""
  return ShapesClassifier({**(config or {}), '_class_name': CLASS_NAME}, rngs=nnx.Rngs(seed))


def _blur(images: jax.Array, sigma: jax.Array, radius: int = 4) -> jax.Array:
  """Separable gaussian blur with one sigma per image (σ → 0 leaves the image as it is); edges replicate,
  so the white border stays white."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(taps / jnp.maximum(sigma, 1e-3)[:, None]))
  w = w / w.sum(-1, keepdims=True)  # (B, taps)
  n = images.shape[1]
  for axis in (1, 2):
    padded = jnp.pad(images, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode='edge')
    shifted = [jax.lax.slice_in_dim(padded, t, t + n, axis=axis) for t in range(2 * radius + 1)]
    images = sum(w[:, t, None, None, None] * s for t, s in enumerate(shifted))
  return images


def augment(key: jax.Array, images: jax.Array, noise: jax.Array) -> jax.Array:
  """Degrades float images in [0, 1] the ways a generated image may be imperfect: blur (σ up to 1.6 px on
  70 % of images), colour jitter (per channel ±8 % gain and ±0.06 offset) and gaussian noise (σ up to 0.1
  per image, times `noise`, standard normal of the images' shape). The caller draws `noise` (on the host,
  with numpy, while the device computes: a jax.random normal this size costs more than the training step's
  convolutions on a CPU)."""
  b = images.shape[0]
  k = jax.random.split(key, 5)
  sigma = jax.random.uniform(k[0], (b,), maxval=1.6) * jax.random.bernoulli(k[1], 0.7, (b,))
  x = _blur(images, sigma)
  gain = 1 + jax.random.uniform(k[2], (b, 1, 1, 3), minval=-0.08, maxval=0.08)
  offset = jax.random.uniform(k[3], (b, 1, 1, 3), minval=-0.06, maxval=0.06)
  noise_level = jax.random.uniform(k[4], (b, 1, 1, 1), maxval=0.1)
  return jnp.clip(x * gain + offset + noise_level * noise, 0, 1)


def training_batch(rng: np.random.Generator, n: int, unrecognisable_n: int = 0):
  """n fresh drawings (uint8), then `unrecognisable_n` unrecognisable images, with their shape and colour ids
  (SHAPE_LABELS, COLOUR_LABELS), sides in TRAIN_SIDES anywhere on the canvas, and standard normal noise for
  `augment`. The drawings' edges wobble as generated ones do (unrecognisable.faithful), so that a judge
  that rejects learns that only what is clearly distorted is 'none'."""
  shape_ids = rng.integers(0, len(world.SHAPES), n)
  colour_ids = rng.integers(0, len(world.COLOURS), n)
  sides = rng.integers(TRAIN_SIDES[0], TRAIN_SIDES[1] + 1, n)
  positions = rng.integers(0, world.SIZE - sides[:, None] + 1, (n, 2))
  images = unrecognisable.faithful(rng, shape_ids, colour_ids, sides, positions)
  if unrecognisable_n:
    # The same sides and placements as the drawings, so that neither says which kind an image is.
    more = unrecognisable.sample(rng, unrecognisable_n, sides=TRAIN_SIDES, margin=0)[:3]
    images, shape_ids, colour_ids = (np.concatenate(pair) for pair in zip((images, shape_ids, colour_ids), more))
  return images, shape_ids, colour_ids, rng.standard_normal(images.shape, np.float32)


def _loss(model: ShapesClassifier, images, shape_ids, colour_ids):
  shape_logits, colour_logits = model(images)
  return (optax.softmax_cross_entropy_with_integer_labels(shape_logits, shape_ids).mean()
          + optax.softmax_cross_entropy_with_integer_labels(colour_logits, colour_ids).mean())


def train_classifier(steps: int = 1500, seed: int = 0, *, batch_size: int = BATCH_SIZE,
                     unrecognisable_n: int = UNRECOGNISABLE_N, learning_rate: float = LEARNING_RATE,
                     config: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] | None = print) -> ShapesClassifier:
  """Trains a classifier from `seed` on freshly drawn, augmented images with Adam (warm-up, cosine decay, no
  clipping), through fit.fit; `log` receives the loss ten times over the run. Each batch: `batch_size`
  drawings of the world and, for a judge that rejects (`config`'s `reject`, true unless it says false),
  `unrecognisable_n` unrecognisable images.

  Deterministic for a given (steps, seed, batch sizes, learning_rate, config) on a given backend.
  """
  model = build_classifier({**JUDGE, **(config or {})}, seed=seed)
  unrecognisable_n = unrecognisable_n if model.config['reject'] else 0
  graphdef, params = nnx.split(model)

  def loss(params, key, images, shape_ids, colour_ids, noise):
    x = augment(key, images.astype(jnp.float32) / 255, noise)
    return _loss(nnx.merge(graphdef, params), x, shape_ids, colour_ids)

  params, history = fit(params, loss, lambda rng: training_batch(rng, batch_size, unrecognisable_n),
                        steps=steps, seed=seed, learning_rate=learning_rate, clip=None, desc='classifier',
                        log_every=max(1, steps // 10) if log else 0)
  for h in history:
    log(f'classifier step {h["step"]}/{steps}: loss {h["loss"]:.4f} ({h["seconds"]:.0f} s)')
  return nnx.merge(graphdef, params)


@nnx.jit
def _probs(model: ShapesClassifier, images: jax.Array):
  shape_logits, colour_logits = model(images)
  return jax.nn.softmax(shape_logits), jax.nn.softmax(colour_logits)


def predict(model: ShapesClassifier, images, *, batch_size: int = 512):
  """(shape_ids, colour_ids, shape_probs, colour_probs) of NHWC images: uint8 in 0…255, or floats in [0, 1]
  (as pipelines return them). Ids index SHAPE_LABELS and COLOUR_LABELS; all results are numpy arrays."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'predict: expected NHWC RGB images, got an array of shape {images.shape}.')
  if not len(images):
    raise ValueError('predict: no images given.')
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  n = len(images)
  batch_size = min(batch_size, n)
  # Padding the last batch to full size keeps one compiled shape per batch size.
  images = np.concatenate([images, np.zeros((-n % batch_size, *images.shape[1:]), images.dtype)])
  probs = [_probs(model, jnp.asarray(images[i:i + batch_size], jnp.float32) / scale)
           for i in range(0, len(images), batch_size)]
  shape_probs = np.concatenate([np.asarray(p[0]) for p in probs])[:n]
  colour_probs = np.concatenate([np.asarray(p[1]) for p in probs])[:n]
  return shape_probs.argmax(-1), colour_probs.argmax(-1), shape_probs, colour_probs


_augment = jax.jit(augment)


def _degraded(rng: np.random.Generator, seed: int, images: np.ndarray) -> np.ndarray:
  noise = rng.standard_normal(images.shape, np.float32)
  return np.asarray(_augment(jax.random.key(seed), jnp.asarray(images, jnp.float32) / 255, noise))


def held_out_accuracy(model: ShapesClassifier, n: int = 2000, *, seed: int = EVAL_SEED,
                      augmented: bool = False) -> dict[str, float]:
  """Shape and colour accuracy on n fresh world images from `seed` (optionally degraded by `augment`), and
  the fractions of them a rejecting judge answers 'none' (`rejected_shape`, `rejected_colour`)."""
  rng = np.random.default_rng(seed)
  images, shape_ids, colour_ids, _ = world.sample(rng, n)
  if augmented:
    images = _degraded(rng, seed, images)
  pred_shape, pred_colour, _, _ = predict(model, images)
  return {'shape': float(np.mean(pred_shape == shape_ids)), 'colour': float(np.mean(pred_colour == colour_ids)),
          'rejected_shape': float(np.mean(pred_shape == unrecognisable.SHAPE_NONE)),
          'rejected_colour': float(np.mean(pred_colour == unrecognisable.COLOUR_NONE))}


def held_out_unrecognisable(model: ShapesClassifier, n: int = 500, *, seed: int = EVAL_SEED,
                            augmented: bool = False) -> dict[str, dict[str, float | None]]:
  """Per kind of unrecognisable.KINDS, on n fresh images of it from `seed` at the world's sides and positions
  (optionally degraded by `augment`): `rejected`, the fraction of the answers that should be 'none' that are
  (both heads counted), and `kept`, the accuracy of those that should name a shape or colour (None if none)."""
  rng = np.random.default_rng(seed)
  out = {}
  for kind in unrecognisable.KINDS:
    images, shape_ids, colour_ids = unrecognisable.draw(kind, rng, n)
    if augmented:
      images = _degraded(rng, seed, images)
    pred_shape, pred_colour, _, _ = predict(model, images)
    right = np.concatenate([pred_shape == shape_ids, pred_colour == colour_ids])
    none = np.concatenate([shape_ids == unrecognisable.SHAPE_NONE, colour_ids == unrecognisable.COLOUR_NONE])
    out[kind] = {'rejected': float(right[none].mean()), 'kept': float(right[~none].mean()) if (~none).any() else None}
  return out


def save_classifier(model: ShapesClassifier, folder: str | os.PathLike) -> None:
  """Writes `folder/config.json` and `folder/model.safetensors` (fp32), atomically as one folder."""
  with atomic_path(folder) as tmp:
    tmp.mkdir()
    write_json(tmp / 'config.json', dict(model.config))
    write_safetensors(tmp / 'model.safetensors', state_dict(model))


def train_and_save(steps: int, seed: int, folder: str | os.PathLike) -> dict:
  """Trains the judge (train_classifier's defaults) and saves it to `folder` with training.json: settings,
  held-out accuracy and rejection on 2,000 drawings, rejection per kind on 500 unrecognisable images each
  (measure.record_base_model_check adds the judge's view of the shipped model's generations)."""
  start = time.perf_counter()
  model = train_classifier(steps, seed)
  seconds = round(time.perf_counter() - start, 1)
  record = {'steps': steps, 'seed': seed, 'seconds': seconds, 'backend': jax.default_backend(),
            'batch_size': BATCH_SIZE, 'unrecognisable_n': UNRECOGNISABLE_N, 'learning_rate': LEARNING_RATE,
            'held_out_accuracy': {'clean': held_out_accuracy(model),
                                  'degraded': held_out_accuracy(model, augmented=True)},
            'held_out_unrecognisable': {'clean': held_out_unrecognisable(model),
                                        'degraded': held_out_unrecognisable(model, augmented=True)}}
  save_classifier(model, folder)
  write_json(Path(folder) / 'training.json', record)
  return record


def load_classifier(folder: str | os.PathLike) -> ShapesClassifier:
  """The classifier saved in `folder` by save_classifier."""
  folder = Path(folder)
  config_path = folder / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path}: no classifier config here; pass the folder that '
                            'save_classifier wrote.')
  config = json.loads(config_path.read_text())
  model = abstract(lambda: ShapesClassifier(config, rngs=nnx.Rngs(0), source=str(config_path)))
  with SafetensorsReader(folder / 'model.safetensors') as tensors:
    return load_state_dict(model, tensors, source=str(folder / 'model.safetensors'))
