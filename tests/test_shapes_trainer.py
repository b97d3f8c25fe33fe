"""The shapes-world trainer: its tokenizer, one training step of each component, the training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from esd_jax.shapes_world import trainer, world
from esd_jax.shapes_world.fit import fit
from esd_jax.models import build_abstract
from esd_jax.models.clip import canonical_keys, for_vocabulary
from esd_jax.models.state_dict import load_state_dict
from esd_jax.schedulers import make_scheduler
from esd_jax.tiny import SCHEDULER
from esd_jax.tokenizer import tokenize
from tests.reference import numpy_state, torch_twin


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  return trainer.world_tokenizer(tmp_path_factory.mktemp('tok') / 'tokenizer')


def test_tokenizer_makes_every_word_one_token_and_every_caption_fits(tokenizer, tmp_path):
  from transformers import CLIPTokenizer

  ids = {w: tokenizer(w).input_ids for w in world.WORDS}
  assert all(len(v) == 3 for v in ids.values()), ids  # <start> word <end>
  assert len({v[1] for v in ids.values()}) == len(world.WORDS)
  captions = sorted({t.format(colour=c, shape=s) for t, _ in world.CAPTIONS for c in world.COLOURS
                     for s in world.SHAPES})
  tokens = tokenize(tokenizer, captions)
  assert tokens.shape == (len(captions), trainer.MAX_TOKENS)
  eos = tokenizer.eos_token_id
  assert all(row[-1] == eos for row in tokens)  # nothing truncated: the last position is padding or <end>
  # What the pipeline folder holds is what transformers loads.
  tokenizer.save_pretrained(str(tmp_path / 'tok'))
  again = CLIPTokenizer.from_pretrained(str(tmp_path / 'tok'))
  np.testing.assert_array_equal(tokenize(again, captions), tokens)


def _random(config: dict, seed: int):
  """Our model of `config` with random weights drawn by its torch twin: a random starting point for these steps
  that costs no initialiser compilation."""
  torch.manual_seed(seed)
  tensors = numpy_state(torch_twin(config))
  if '_class_name' not in config:  # transformers 5 names the text encoder's tensors without `text_model.`
    tensors = canonical_keys(tensors)
  return load_state_dict(build_abstract(config), tensors, source='torch twin')


def _fit_improves(params, loss_fn, batch, steps=5, learning_rate=3e-3):
  """Loss on one fixed batch before and after a few steps of fit() on it."""
  key, measure = jax.random.key(0), jax.jit(loss_fn)  # one compiled forward rather than op-by-op dispatch
  before = float(measure(params, key, *batch))
  after_params, history = fit(params, loss_fn, lambda rng: batch, steps=steps, seed=0,
                              learning_rate=learning_rate, log_every=1)
  after = float(measure(after_params, key, *batch))
  assert len(history) == steps and all(np.isfinite(h['loss']) for h in history)
  return before, after, after_params


def test_vae_step_reconstructs_better():
  vae = _random(trainer.VAE, seed=0)
  graphdef, params = nnx.split(vae)
  images = jnp.asarray(world.sample(0, 4)[0], jnp.float32) / 127.5 - 1
  loss = lambda p, key, x: trainer.vae_loss(nnx.merge(graphdef, p), key, x, 1e-4)
  before, after, _ = _fit_improves(params, loss, (images,))
  assert after < 0.9 * before, (before, after)
  latents = jax.eval_shape(lambda x: vae.encode(x)[0], images)
  assert latents.shape == (4, 8, 8, 4)  # 64×64×3 ↔ 8×8×4


def test_denoiser_step_trains_unet_and_text_encoder(tokenizer):
  scheduler = make_scheduler(SCHEDULER)
  unet = _random(trainer.UNET, seed=1)
  text = _random(for_vocabulary(trainer.TEXT_ENCODER, len(tokenizer)), seed=2)
  (unet_def, unet_params), (text_def, text_params) = nnx.split(unet), nnx.split(text)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
  ids = jnp.asarray(tokenize(tokenizer, ['a red circle', 'circle', '', 'blue'] * 2), jnp.int32)

  def loss(p, key, latents, ids):
    return trainer.denoiser_loss(nnx.merge(unet_def, p['unet']), nnx.merge(text_def, p['text']), scheduler,
                                     key, latents, ids)

  params = {'unet': unet_params, 'text': text_params}
  before, after, trained = _fit_improves(params, loss, (latents, ids), learning_rate=1e-3)
  assert after < before, (before, after)
  for part in ('unet', 'text'):  # the text encoder learns through the UNet's cross-attention
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params[part], trained[part])
    assert max(jax.tree.leaves(moved)) > 0, part


def test_fit_is_deterministic_and_ema_lags():
  params = {'w': jnp.zeros((3,))}
  target = jnp.asarray([1.0, -2.0, 3.0])
  loss = lambda p, key, t: jnp.sum(jnp.square(p['w'] - t))
  run = lambda **kw: fit(params, loss, lambda rng: (target + 0.01 * rng.standard_normal(3),), steps=200, seed=3,
                         learning_rate=0.2, **kw)[0]['w']
  np.testing.assert_array_equal(run(), run())
  plain, averaged = run(), run(ema_decay=0.9)
  assert np.linalg.norm(plain - target) < 0.1
  assert not np.allclose(plain, averaged)
  with pytest.raises(FloatingPointError, match='step 1'):
    fit(params, lambda p, key, t: jnp.sum(p['w'] * t) / 0.0, lambda rng: (target,), steps=2, seed=0,
        learning_rate=0.1, log_every=1)


def test_recipe_is_the_train_world_config():
  from configs.train_world import get_config
  assert trainer.Recipe(**get_config().world.to_dict()) == trainer.Recipe()
