"""Is it really erased? A white-box search for a prompt that brings an erased concept back (UnlearnDiffAtk), and the
text side of robust erasure (esd.Adversary, AdvUnlearn). docs/method.md §9.

The attacked prompt is "<start> x₁ … x_k <the prompt's words> <end>": k adversarial tokens after the start token
(UnlearnDiffAtk's prefix; k is the budget's `tokens`). Each attack is one (prompt, seed). Adam moves the k word
embeddings (continuous, from random vocabulary tokens), through the frozen text encoder and UNet, to lower either
UnlearnDiffAtk's objective, the attacked model's denoising loss on the original model's image of the prompt from
that seed, E‖ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) n, t, c_adv) − n‖², or, where a judge exists, −log p(concept) the judge gives the
attacked model's own image from that seed (through the sampler and the VAE). Each embedding is then projected to its
nearest vocabulary token (cosine similarity, as PEZ does) for a discrete prompt. The attacked model draws both from
the seed's noise, and a judge says whether the concept came back. All attacks of all models run in one jitted search
(vmapped over models, batched over prompts × seeds); every random draw is an input (`draw`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esd_jax import esd
from esd_jax.errors import RunError
from esd_jax.generate import Conditioning, _images, encode_prompts, latent_size, overlay_stack
from esd_jax.models.state_dict import ParamLayout, split_flat
from esd_jax.pipeline import StableDiffusion
from esd_jax.schedulers import make_scheduler
from esd_jax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class Budget:
  """What an attack may spend: Adam `steps` at `learning_rate` on `tokens` adversarial tokens, toward `objective`:
  'denoise' (UnlearnDiffAtk: the attacked model's denoising loss on the original model's image) or 'classifier'
  (a judge's log-probability of the concept on the attacked model's own image, drawn with `sample_steps` DDIM steps,
  differentiated through the sampler and the VAE)."""

  steps: int = 20
  tokens: int = 3
  learning_rate: float = 0.05
  objective: str = 'denoise'
  sample_steps: int = 5

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f'attack objective {self.objective!r}: choose one of {OBJECTIVES}.')


OBJECTIVES = ('denoise', 'classifier')


def word_mask(tokenizer, ids: np.ndarray) -> np.ndarray:
  """1.0 at a prompt's word tokens (after the start token, before the first end token), else 0: (…, L)."""
  ids = np.asarray(ids)
  end = np.argmax(ids == tokenizer.eos_token_id, axis=-1)
  return ((np.arange(ids.shape[-1]) > 0) & (np.arange(ids.shape[-1]) < end[..., None])).astype(np.float32)


def prefixed(tokenizer, prompts: Sequence[str], tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, slots) of each prompt with `tokens` free slots after the start token: ids (P, L) hold the end token in
  the slots (the search fills them), slots (P, L) is 1.0 there. Raises when a prompt leaves no room."""
  ids = np.asarray(tokenize(tokenizer, list(prompts)))
  length = ids.shape[1]
  for prompt, words in zip(prompts, word_mask(tokenizer, ids).sum(-1)):
    if words + tokens + 2 > length:
      raise ValueError(f'attack.tokens = {tokens}: {prompt!r} has {int(words)} tokens and the text encoder reads '
                       f'{length} with the start and end tokens; lower --config.attack.tokens to at most '
                       f'{length - 2 - int(words)} or shorten the prompt.')
  slots = np.zeros_like(ids, np.float32)
  slots[:, 1:1 + tokens] = 1
  # The words and the end token move right by k; only padding falls off the end.
  shifted = np.concatenate([ids[:, :1], np.full((len(ids), tokens), tokenizer.eos_token_id), ids[:, 1:length - tokens]],
                           axis=1)
  return shifted, slots


def candidate_tokens(tokenizer, vocab_size: int) -> np.ndarray:
  """The ids an adversarial token may take: the vocabulary without the start, end and padding tokens."""
  special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
  return np.asarray([i for i in range(vocab_size) if i not in special], np.int32)


def adversary_of(pipe: StableDiffusion, plan, erase) -> esd.Adversary:
  """erase.adversarial's search (esd.Adversary) on each concept's student prompt (its erase_from prompt, else the
  concept), as train.encode_concepts encodes them."""
  if pipe.is_sdxl:
    raise RunError('erase.adversarial searches the CLIP text encoder of SD 1.x/2.x; SDXL conditions on two encoders '
                   'and a pooled embedding, which the search does not move yet: set --config.erase.adversarial=False.')
  if plan.separate:
    raise RunError('erase.adversarial trains one model: set --config.erase.separate_models=False, or '
                   '--config.erase.adversarial=False.')
  layout, encoder = split_flat(pipe.text_encoder)
  ids = np.asarray(tokenize(pipe.tokenizer, [c.erase_from or c.prompt for c in plan.concepts]))
  return esd.Adversary(encoder, encoder[esd.TOKEN_EMBEDDING][ids], jnp.asarray(word_mask(pipe.tokenizer, ids)[..., None]),
                       layout, erase.adversarial_steps, erase.adversarial_learning_rate)


class Draws(NamedTuple):
  """The search's random draws: `tokens` (J, k) the initial adversarial token ids, and per step and attack a
  timestep `t` (S, J) and the noise (S, J, h, w, c) added to its target (each attack draws as if it ran alone)."""

  tokens: jax.Array
  t: jax.Array
  noise: jax.Array


def draw(key: jax.Array, budget: Budget, jobs: int, latent_shape: tuple[int, int, int], candidates: jax.Array,
         num_train_timesteps: int) -> Draws:
  k_tokens, k_t, k_noise = jax.random.split(key, 3)
  tokens = jax.random.choice(k_tokens, candidates, (jobs, budget.tokens))
  t = jax.random.randint(k_t, (budget.steps, jobs), 0, num_train_timesteps)
  return Draws(tokens, t, jax.random.normal(k_noise, (budget.steps, jobs, *latent_shape), jnp.float32))


def denoising_loss(unet, context: jax.Array, x0: jax.Array, t: jax.Array, noise: jax.Array,
                   alphas_cumprod: jax.Array) -> jax.Array:
  """Per image (J,): mean((ε(√ᾱ_t x₀ + √(1−ᾱ_t) n, t, context) − n)²), UnlearnDiffAtk's attack loss; t: one
  timestep, or one per image (J,)."""
  a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
  return jnp.mean(jnp.square(unet(x_t, t, context) - noise), axis=(1, 2, 3))


def attack_loss(unet, text_layout: ParamLayout, encoder, embeds: jax.Array, x0: jax.Array, t: jax.Array,
                noise: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
  """The search's objective for word embeddings `embeds` (J, L, D): each attack's denoising loss, summed."""
  context = esd.encode_embeddings(text_layout, encoder, embeds)
  return jnp.sum(denoising_loss(unet, context, x0, t, noise, alphas_cumprod))


class Judge(NamedTuple):
  """The classifier objective's judge: its parameters, and per model the concept it must see, as (head, label):
  head 0 reads its first output (shapes), 1 its second (colours)."""

  params: object
  concept: jax.Array  # (M, 2) int32


class _Decoder(NamedTuple):
  """What generate._images reads of a VAE."""

  config: Mapping
  decode: object


def judged_loss(unet, vae, judge, scheduler, steps: int, context: jax.Array, latents: jax.Array, uncond: jax.Array,
                guidance: jax.Array, concept: jax.Array) -> jax.Array:
  """−Σ log p(concept) the judge gives the images `unet` draws from `latents` with `context` (the classifier
  objective). The sampler's UNet calls and the decoder are rematerialised: the backward pass holds one step's input
  per step, not its activations."""
  unet_call = jax.checkpoint(lambda x, t, c, added: unet(x, t, c, added))
  decoder = _Decoder(vae.config, jax.checkpoint(vae.decode))
  images = _images(unet_call, decoder, scheduler, steps, latents, Conditioning(context), Conditioning(uncond), guidance,
                   0.0, None, jnp.float32)[0]
  logits = jnp.where(concept[0] == 0, *judge(images))
  return -jnp.sum(jax.nn.log_softmax(logits)[:, concept[1]])


@functools.partial(jax.jit, static_argnames=('unet_layout', 'text_layout', 'budget', 'models', 'vae_def', 'judge_def',
                                             'scheduler'))
def search(unet_layout: ParamLayout, shared, stacked, text_layout: ParamLayout, encoder, embeds: jax.Array,
           slots: jax.Array, x0: jax.Array, draws: Draws, scheduler, vae_def, vae_params, latents: jax.Array,
           uncond: jax.Array, guidance: jax.Array, judge_def, judge: Judge | None, *, budget: Budget,
           models: int) -> tuple[jax.Array, jax.Array]:
  """The continuous attack on every model at once: (embeddings (M, J, L, D) found, summed loss per step (M, S)).

  Model m's attacks: `embeds[m]` (J, L, D) their prompts' embeddings with the slots filled by the initial tokens,
  `slots[m]` (J, L, 1) where they may move, `x0[m]` (J, h, w, c) their target latents (denoise objective);
  `latents` (J, …) their seeds' noise and `judge` (classifier objective). Each attack's gradient is that of its own
  loss (the losses are summed, not averaged), so Adam steps each as if it ran alone."""
  def one_model(overlay, embeds, slots, x0, concept):
    unet = unet_layout.module({**shared, **overlay})

    def loss(delta, t, noise):
      if budget.objective == 'denoise':
        return attack_loss(unet, text_layout, encoder, embeds + slots * delta, x0, t, noise, scheduler.alphas_cumprod)
      context = esd.encode_embeddings(text_layout, encoder, embeds + slots * delta)
      return judged_loss(unet, nnx.merge(vae_def, vae_params), nnx.merge(judge_def, judge.params), scheduler,
                         budget.sample_steps, context, latents, uncond, guidance, concept)

    tx = optax.adam(budget.learning_rate)

    def step(carry, draw_t):
      delta, opt_state = carry
      value, grads = jax.value_and_grad(loss)(delta, *draw_t)
      updates, opt_state = tx.update(grads, opt_state)
      return (optax.apply_updates(delta, updates), opt_state), value

    zero = jnp.zeros_like(embeds)
    (delta, _), losses = jax.lax.scan(step, (zero, tx.init(zero)), (draws.t, draws.noise))
    return embeds + slots * delta, losses
  concepts = jnp.zeros((models, 2), jnp.int32) if judge is None else judge.concept
  return jax.vmap(one_model, axis_size=models)(stacked, embeds, slots, x0, concepts)


def project(embeds: jax.Array, table: jax.Array, candidates: jax.Array) -> jax.Array:
  """The candidate token ids nearest (cosine similarity) to each embedding (…, D)."""
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return candidates[jnp.argmax(unit(embeds) @ unit(table[candidates]).T, axis=-1)]


@functools.partial(jax.jit, static_argnames=('unet_layout', 'vae_def', 'scheduler', 'steps', 'models'))
def draw_images(unet_layout: ParamLayout, shared, stacked, vae_def, vae_params, scheduler, steps: int, models: int,
                latents: jax.Array, context: jax.Array, uncond: jax.Array, guidance: jax.Array):
  """(images (M, J, H, W, 3), final latents (M, J, h, w, c)): model m draws from `latents` (J, …) with its own
  conditioning context[m] (J, L, D') and the shared unconditional one, DDIM with classifier-free guidance."""
  def one_model(overlay, ctx):
    unet = unet_layout.module({**shared, **overlay})
    return _images(unet, nnx.merge(vae_def, vae_params), scheduler, steps, latents, Conditioning(ctx),
                   Conditioning(uncond), guidance, 0.0, None, jnp.float32)
  return jax.vmap(one_model, axis_size=models)(stacked, context)


@dataclasses.dataclass
class Attack:
  """What `run_attack` found and drew. Model m's attack j is on prompts[m][j // len(seeds)] from seed
  seeds[j % len(seeds)]: `texts[m][j]` its discrete prompt, `ids` (M, J, L) its tokens, `losses` (M, S) the search's
  loss per step (summed over attacks), `images` {'prompt': the prompt as given, 'continuous': the embeddings found,
  'discrete': the projected prompt} of (M, J, H, W, 3) images, `targets` (M, J, H, W, 3) the original model's
  images the search aimed at."""

  prompts: list[list[str]]
  seeds: list[int]
  texts: list[list[str]]
  ids: np.ndarray
  losses: np.ndarray
  images: dict[str, np.ndarray]
  targets: np.ndarray


def run_attack(pipe: StableDiffusion, overlays: Sequence[Mapping[str, jax.Array]], prompts: Sequence[Sequence[str]],
               seeds: Sequence[int], noise: np.ndarray, budget: Budget, *, key: jax.Array, steps: int = 50,
               guidance_scale: float = 7.5, judge=None, concepts: Sequence[tuple[int, int]] = ()) -> Attack:
  """Attacks model m (`pipe` with overlays[m] laid over its UNet, held layout; {} is the original) on its prompts[m]
  (as many for every model) × seeds, all models in one search. Seed s's images (the original model's targets and
  every attacked image) start from noise[s] (len(seeds), h, w, c); DDIM `steps`, guidance `guidance_scale`. The
  classifier objective needs `judge` (an nnx module: images → (shape logits, colour logits)) and per model the
  (head, label) it must see, `concepts`."""
  if budget.objective == 'classifier' and (judge is None or len(concepts) != len(overlays)):
    raise ValueError('attack: the classifier objective needs a judge and, per model, the (head, label) it must see.')
  if pipe.is_sdxl:
    raise ValueError('attack: the search moves the CLIP word embeddings of SD 1.x/2.x; SDXL is not supported.')
  prompts, seeds = [list(p) for p in prompts], list(seeds)
  if len(prompts) != len(overlays) or len({len(p) for p in prompts}) != 1 or not prompts[0] or not seeds:
    raise ValueError(f'attack: give every one of the {len(overlays)} models as many prompts (got '
                     f'{[len(p) for p in prompts]}) and at least one seed.')
  models, jobs = len(overlays), len(prompts[0]) * len(seeds)
  texts = [p for model in prompts for p in model for _ in seeds]  # (M·J), model-major, then prompt, then seed
  unet_layout, params = split_flat(pipe.unet)
  shared, stacked = overlay_stack(params, overlays)
  text_layout, encoder = split_flat(pipe.text_encoder)
  vae_def, vae_params = nnx.split(pipe.vae)
  scheduler = make_scheduler(pipe.scheduler_config, 'ddim')
  shape = (*latent_size(pipe, None, None), pipe.unet.config['in_channels'])
  if np.shape(noise) != (len(seeds), *shape):
    raise ValueError(f'attack: noise of shape {np.shape(noise)}; give one {shape} latent per seed.')
  latents = jnp.tile(jnp.asarray(noise), (len(prompts[0]), 1, 1, 1))  # (J, …): attack j starts from seed j % S
  per_model = lambda a: a.reshape(models, jobs, *a.shape[1:])
  plain = per_model(encode_prompts(pipe, texts).context)
  uncond = encode_prompts(pipe, [''] * jobs).context

  def sample(shared, stacked, n, context):
    return draw_images(unet_layout, shared, stacked, vae_def, vae_params, scheduler, steps, n,
                       jnp.tile(latents, (context.shape[1] // jobs, 1, 1, 1)), context,
                       jnp.tile(uncond, (context.shape[1] // jobs, 1, 1)), jnp.float32(guidance_scale))
  # The targets: the original model (one model) draws every model's prompts in one batch.
  targets, x0 = sample(*overlay_stack(params, [{}]), 1, plain.reshape(1, models * jobs, *plain.shape[2:]))

  table = encoder[esd.TOKEN_EMBEDDING]
  candidates = jnp.asarray(candidate_tokens(pipe.tokenizer, table.shape[0]))
  ids, slots = prefixed(pipe.tokenizer, texts, budget.tokens)
  draws = draw(key, budget, models * jobs, shape, candidates, scheduler.num_train_timesteps)
  ids = per_model(jnp.asarray(ids).at[:, 1:1 + budget.tokens].set(draws.tokens))
  slots = per_model(jnp.asarray(slots))[..., None]
  draws = draws._replace(t=draws.t[:, :jobs], noise=draws.noise[:, :jobs])  # every model's attack j: the same
  judge_def, judged = (None, None) if judge is None else (
      nnx.graphdef(judge), Judge(nnx.state(judge), jnp.asarray(concepts, jnp.int32).reshape(models, 2)))
  found, losses = search(unet_layout, shared, stacked, text_layout, encoder, table[ids], slots, per_model(x0[0]),
                         draws, scheduler, vae_def, vae_params, latents, uncond, jnp.float32(guidance_scale),
                         judge_def, judged, budget=budget, models=models)
  discrete = jnp.where(slots[..., 0] > 0, project(found, table, candidates), ids)
  encode = jax.jit(jax.vmap(functools.partial(esd.encode_embeddings, text_layout, encoder)))
  contexts = {'prompt': plain, 'continuous': encode(found), 'discrete': encode(table[discrete])}
  images = {name: np.asarray(sample(shared, stacked, models, ctx)[0]) for name, ctx in contexts.items()}
  discrete = np.asarray(discrete)
  decoded = [[pipe.tokenizer.decode(row[word_mask(pipe.tokenizer, row) > 0]) for row in model] for model in discrete]
  return Attack(prompts, seeds, decoded, discrete, np.asarray(losses), images, per_model(np.asarray(targets[0])))
