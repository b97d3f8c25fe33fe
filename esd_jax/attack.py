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
(vmapped over models, batched over prompts × seeds), placed on a device mesh by erase's rules (`Placement`), in
chunks of steps after each of which its state can be saved and resumed (`Saved`); every random draw is an input
(`step_draws`: step i's from fold_in(key, i), whatever the chunks)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from esd_jax import distributed, esd, sharding
from esd_jax.errors import RunError
from esd_jax.files import SafetensorsReader, tensor_summary, write_safetensors
from esd_jax.log import log
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


def prefixed(tokenizer, prompts: Sequence[str], tokens: int, field: str = 'attack.tokens'
             ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, slots) of each prompt with `tokens` free slots after the start token: ids (P, L) hold the end token in
  the slots (the search fills them), slots (P, L) is 1.0 there. Raises when a prompt leaves no room, naming the
  config `field` that set `tokens`."""
  ids = np.asarray(tokenize(tokenizer, list(prompts)))
  length = ids.shape[1]
  for prompt, words in zip(prompts, word_mask(tokenizer, ids).sum(-1)):
    if words + tokens + 2 > length:
      raise ValueError(f'{field} = {tokens}: {prompt!r} has {int(words)} tokens and the text encoder reads '
                       f'{length} with the start and end tokens; lower --config.{field} to at most '
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
  concept), as train.encode_concepts encodes them; with erase.adversarial_tokens = k, that prompt with k slots
  after its start token (`prefixed`, as the attack's prompts)."""
  layout, encoder = adversary_encoder(pipe.text_encoder, plan, sdxl=pipe.is_sdxl)
  prompts, tokens = [c.erase_from or c.prompt for c in plan.concepts], erase.get('adversarial_tokens', 0)
  if tokens:
    ids, free = prefixed(pipe.tokenizer, prompts, tokens, 'erase.adversarial_tokens')
  else:
    ids = np.asarray(tokenize(pipe.tokenizer, prompts))
    free = word_mask(pipe.tokenizer, ids)
  table = encoder[esd.TOKEN_EMBEDDING]
  # Every id but the special ones, repeated to the vocabulary's length: the array's shape is the table's, so that
  # `plan` builds it from the text encoder's config alone (the first few ids are twice as likely: negligible).
  candidates = jnp.asarray(np.resize(candidate_tokens(pipe.tokenizer, table.shape[0]), table.shape[0]))
  return esd.Adversary(encoder, table[ids], jnp.asarray(free[..., None]), candidates, layout, erase.adversarial_steps,
                       erase.adversarial_learning_rate, tokens)


def adversary_encoder(text_encoder: nnx.Module, plan, *, sdxl: bool) -> tuple[ParamLayout, dict[str, jax.Array]]:
  """The text encoder robust erasure searches through (its layout and flat parameters; shapes only for an abstract
  module, as `plan` compiles it), after refusing the runs it does not support."""
  if sdxl:
    raise RunError('erase.adversarial searches the CLIP text encoder of SD 1.x/2.x; SDXL conditions on two encoders '
                   'and a pooled embedding, which the search does not move yet: set --config.erase.adversarial=False.')
  if plan.separate:
    raise RunError('erase.adversarial trains one model: set --config.erase.separate_models=False, or '
                   '--config.erase.adversarial=False.')
  return split_flat(text_encoder)


class Draws(NamedTuple):
  """The random draws of a run of search steps, per step and attack: a timestep `t` (C, J) and the noise
  (C, J, h, w, c) added to its target (each attack draws as if it ran alone)."""

  t: jax.Array
  noise: jax.Array


@functools.partial(jax.jit, static_argnames=('count', 'jobs', 'latent_shape', 'num_train_timesteps'))
def step_draws(key: jax.Array, first: jax.Array, *, count: int, jobs: int, latent_shape: tuple[int, int, int],
               num_train_timesteps: int) -> Draws:
  """The draws of search steps first … first + count − 1: step i's from fold_in(key, i), so a chunk of the search
  draws what the whole search draws at those steps, and a longer search begins as a shorter one."""
  def one(i):
    k_t, k_noise = jax.random.split(jax.random.fold_in(key, i))
    return Draws(jax.random.randint(k_t, (jobs,), 0, num_train_timesteps),
                 jax.random.normal(k_noise, (jobs, *latent_shape), jnp.float32))
  return jax.vmap(one)(first + jnp.arange(count))


def attack_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """An array (M, J, …) of model m's attack j: models over `concept`, attacks over `data`; (M,) over `concept`."""
  return NamedSharding(mesh, P('concept', 'data') if ndim > 1 else P('concept'))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where an attack's arrays live on a (concept, data, fsdp) mesh (esd_jax/sharding.py), by erase's rules: every
  tensor of the base UNet, text encoder and VAE of at least `min_shard_size` elements split over `fsdp`, the tensors
  the attacked models change stacked over `concept` (so each model's lie with its attacks), model m's attacks
  (M, J, …) over `concept` × `data`, and a batch of attacks (J, …) over `data`."""

  mesh: Mesh
  min_shard_size: int = 2 ** 18

  @classmethod
  def one_device(cls) -> Placement:
    """The first device alone (a 1 × 1 × 1 mesh): what a caller that names no mesh gets."""
    return cls(jax.make_mesh((1, 1, 1), sharding.AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:1]))

  def check(self, models: int, jobs: int) -> None:
    """Refuses a mesh that would split a model or an attack across devices unevenly."""
    concept, data = self.mesh.shape['concept'], self.mesh.shape['data']
    if models % concept:
      raise RunError(f'mesh.concept = {concept} does not divide the {models} models attacked (the original model '
                     f'once per concept, then each weights file): set --config.mesh.concept to a divisor of {models}.')
    if jobs % data:
      raise RunError(f'mesh.data = {data} does not divide the {jobs} attacks on each model (prompts × seeds): set '
                     f'--config.mesh.data to a divisor of {jobs} (with --config.mesh.fsdp=-1 taking the devices it '
                     'leaves), or --config.attack.seeds so that prompts × seeds is a multiple of it.')

  def param_sharding(self, key: str, shape: tuple[int, ...]) -> NamedSharding:
    """A base tensor's placement (load_model's `sharding`): split over `fsdp` as erase splits its frozen base."""
    return NamedSharding(self.mesh, sharding.param_spec(tuple(shape), self.mesh, self.min_shard_size))

  def params(self, tree):
    return jax.tree.map(lambda a: distributed.put(a, self.param_sharding('', a.shape)), tree)

  def stacked(self, tree):
    """Tensors stacked over the models (M, …): the model axis over `concept`, each model's tensor as a base one."""
    return jax.tree.map(lambda a: distributed.put(a, sharding.stacked(self.param_sharding('', a.shape[1:]))), tree)

  def attacks(self, tree):
    return jax.tree.map(lambda a: distributed.put(a, attack_sharding(self.mesh, a.ndim)), tree)

  def models(self, a):
    return distributed.put(a, sharding.over_models(self.mesh))

  def batch(self, a, axis: int = 0):
    """A batch of attacks along `axis` over `data` (check made it divide)."""
    return distributed.put(a, sharding.batch_sharding(self.mesh, a.shape[axis], a.ndim, batch_axis=axis))

  def replicated(self, tree):
    return jax.tree.map(lambda a: distributed.put(a, sharding.replicated(self.mesh)), tree)


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


class Search(NamedTuple):
  """The search's state, per model and attack: how far the slots' embeddings moved, `delta` (M, J, L, D), and its
  Adam state (moments like delta, step counts (M,))."""

  delta: jax.Array
  adam: optax.OptState


def start(budget: Budget, embeds: jax.Array) -> Search:
  """The state before the first step: nothing moved."""
  zero = jnp.zeros_like(embeds)
  return Search(zero, jax.vmap(optax.adam(budget.learning_rate).init)(zero))


@functools.partial(jax.jit, static_argnames=('unet_layout', 'text_layout', 'budget', 'models', 'vae_def', 'judge_def',
                                             'scheduler', 'mesh'))
def search(unet_layout: ParamLayout, shared, stacked, text_layout: ParamLayout, encoder, embeds: jax.Array,
           slots: jax.Array, x0: jax.Array, state: Search, draws: Draws, scheduler, vae_def, vae_params,
           latents: jax.Array, uncond: jax.Array, guidance: jax.Array, judge_def, judge: Judge | None, *,
           budget: Budget, models: int, mesh: Mesh) -> tuple[Search, jax.Array]:
  """C = len(draws.t) steps of the continuous attack on every model at once, from `state`: (the state after them,
  the summed loss per model and step (M, C)). The embeddings found are embeds + slots · delta.

  Model m's attacks: `embeds[m]` (J, L, D) their prompts' embeddings with the slots filled by the initial tokens,
  `slots[m]` (J, L, 1) where they may move, `x0[m]` (J, h, w, c) their target latents (denoise objective);
  `latents` (J, …) their seeds' noise and `judge` (classifier objective). Each attack's gradient is that of its own
  loss (the losses are summed, not averaged), so Adam steps each as if it ran alone."""
  tx = optax.adam(budget.learning_rate)

  def one_model(overlay, embeds, slots, x0, concept, state):
    unet = unet_layout.module({**shared, **overlay})

    def loss(delta, t, noise):
      if budget.objective == 'denoise':
        return attack_loss(unet, text_layout, encoder, embeds + slots * delta, x0, t, noise, scheduler.alphas_cumprod)
      context = esd.encode_embeddings(text_layout, encoder, embeds + slots * delta)
      return judged_loss(unet, nnx.merge(vae_def, vae_params), nnx.merge(judge_def, judge.params), scheduler,
                         budget.sample_steps, context, latents, uncond, guidance, concept)

    def step(state, draw_t):
      value, grads = jax.value_and_grad(loss)(state.delta, *draw_t)
      updates, adam = tx.update(grads, state.adam)
      return Search(optax.apply_updates(state.delta, updates), adam), value
    return jax.lax.scan(step, state, (draws.t, draws.noise))
  concepts = jnp.zeros((models, 2), jnp.int32) if judge is None else judge.concept
  state, losses = jax.vmap(one_model, axis_size=models)(stacked, embeds, slots, x0, concepts, state)
  # The state leaves as it came, each model's attacks on their own devices, ready for the next chunk.
  state = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, attack_sharding(mesh, a.ndim)), state)
  return state, jax.lax.with_sharding_constraint(losses, sharding.over_models(mesh))


def project(embeds: jax.Array, table: jax.Array, candidates: jax.Array) -> jax.Array:
  """The candidate token ids nearest (cosine similarity) to each embedding (…, D)."""
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return candidates[jnp.argmax(unit(embeds) @ unit(table[candidates]).T, axis=-1)]


@functools.partial(jax.jit, static_argnames=('text_layout',))
def encode_models(text_layout: ParamLayout, encoder, embeds: jax.Array) -> jax.Array:
  """The text conditioning (M, J, L, D') of word embeddings (M, J, L, D)."""
  return jax.vmap(functools.partial(esd.encode_embeddings, text_layout, encoder))(embeds)


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


@dataclasses.dataclass(frozen=True)
class Saved:
  """Where a search keeps its state: after every `every` steps it writes it (the step, the state, the losses so far,
  and what identifies the attack) to `path`, a safetensors file renamed into place when complete, and a search of
  the same attack resumes from there. `run` adds the caller's settings (model, weights files, …) to what
  run_attack identifies itself (`identity`); the step count is in neither, so a finished search can be extended."""

  path: Path
  every: int
  run: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def identity(overlays: Sequence[Mapping[str, jax.Array]], prompts: Sequence[Sequence[str]], seeds: Sequence[int],
             noise: np.ndarray, budget: Budget, key: jax.Array, *, steps: int, guidance_scale: float,
             concepts: Sequence[tuple[int, int]]) -> dict[str, Any]:
  """What a saved search must agree with to be resumed (JSON): each model's overlay (per tensor, the float64 sum and
  sum of squares: files.tensor_summary), the prompts, seeds and their noise, the budget but its steps, the key, the
  sampling and the judged concepts."""
  overlays = [_digest(b''.join(tensor_summary(k, distributed.gather(o[k])) for k in sorted(o))) for o in overlays]
  return json.loads(json.dumps({
      'overlays': overlays, 'prompts': [list(p) for p in prompts], 'seeds': [int(s) for s in seeds],
      'noise': _digest(np.ascontiguousarray(noise, np.float32).tobytes()),
      'budget': {k: v for k, v in dataclasses.asdict(budget).items() if k != 'steps'},
      'key': np.asarray(jax.random.key_data(key)).tolist(), 'sample_steps': steps, 'guidance_scale': guidance_scale,
      'concepts': [list(c) for c in concepts]}))  # through JSON: tuples as lists, as a saved file reads back


def _save(saved: Saved, run: Mapping[str, Any], state: Search, losses: np.ndarray, step: int) -> None:
  """Writes the state after `step` steps (every process gathers it; process 0 writes)."""
  leaves = jax.tree_util.tree_flatten_with_path(distributed.gather(state))[0]
  tensors = {'losses': losses, **{'state' + jax.tree_util.keystr(path): np.asarray(a) for path, a in leaves}}
  if distributed.is_main():
    write_safetensors(saved.path, tensors, metadata={'run': json.dumps(run, sort_keys=True), 'step': str(step)})
  distributed.barrier('attack: search saved')


def _resume(saved: Saved, run: Mapping[str, Any], initial: Search, place: Placement, steps: int
            ) -> tuple[Search, np.ndarray, int]:
  """(state, losses (M, step), step) of the saved search; `initial`, no losses and 0 if none is saved. Refuses one of
  another attack, or one that went further than `steps`."""
  if not saved.path.is_file():
    return initial, np.zeros((len(initial.delta), 0), np.float32), 0
  with SafetensorsReader(saved.path) as tensors:
    was, step = json.loads(tensors.metadata['run']), int(tensors.metadata['step'])
    differ = {k: (was.get(k), v) for k, v in run.items() if was.get(k) != v}
    if differ:
      lines = '; '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in sorted(differ.items()))
      raise RunError(f'{saved.path} holds the search of a different attack ({lines}). Resuming would mix two attacks: '
                     'use another --config.workdir, or delete that file to search afresh.')
    if step > steps:
      raise RunError(f'{saved.path} holds a search of {step} steps, more than attack.steps = {steps}: set '
                     f'--config.attack.steps to at least {step}, or delete that file to search afresh.')
    paths, tree = jax.tree_util.tree_flatten_with_path(initial)
    state = jax.tree_util.tree_unflatten(tree, [tensors['state' + jax.tree_util.keystr(p)]() for p, _ in paths])
    losses = tensors['losses']()
  log.info('Resumed the attack from step %d of %s', step, saved.path)
  return place.attacks(state), losses, step


def run_attack(pipe: StableDiffusion, overlays: Sequence[Mapping[str, jax.Array]], prompts: Sequence[Sequence[str]],
               seeds: Sequence[int], noise: np.ndarray, budget: Budget, *, key: jax.Array, steps: int = 50,
               guidance_scale: float = 7.5, judge=None, concepts: Sequence[tuple[int, int]] = (),
               placement: Placement | None = None, saved: Saved | None = None, progress: bool = False) -> Attack:
  """Attacks model m (`pipe` with overlays[m] laid over its UNet, held layout; {} is the original) on its prompts[m]
  (as many for every model) × seeds, all models in one search. Seed s's images (the original model's targets and
  every attacked image) start from noise[s] (len(seeds), h, w, c); DDIM `steps`, guidance `guidance_scale`. The
  classifier objective needs `judge` (an nnx module: images → (shape logits, colour logits)) and per model the
  (head, label) it must see, `concepts`.

  `placement` puts the models and attacks on a device mesh (default: one device); with `saved`, the search runs in
  chunks of saved.every steps, saving its state after each, and resumes from a saved one (a finished one is not
  searched again). `progress`: a bar over the search's steps (process 0's)."""
  if budget.objective == 'classifier' and (judge is None or len(concepts) != len(overlays)):
    raise ValueError('attack: the classifier objective needs a judge and, per model, the (head, label) it must see.')
  if pipe.is_sdxl:
    raise ValueError('attack: the search moves the CLIP word embeddings of SD 1.x/2.x; SDXL is not supported.')
  prompts, seeds = [list(p) for p in prompts], list(seeds)
  if len(prompts) != len(overlays) or len({len(p) for p in prompts}) != 1 or not prompts[0] or not seeds:
    raise ValueError(f'attack: give every one of the {len(overlays)} models as many prompts (got '
                     f'{[len(p) for p in prompts]}) and at least one seed.')
  models, jobs = len(overlays), len(prompts[0]) * len(seeds)
  place = placement or Placement.one_device()
  place.check(models, jobs)
  texts = [p for model in prompts for p in model for _ in seeds]  # (M·J), model-major, then prompt, then seed
  unet_layout, params = split_flat(pipe.unet)
  params = place.params(params)
  shared, stacked = overlay_stack(params, overlays)
  stacked = place.stacked(stacked)
  text_layout, encoder = split_flat(pipe.text_encoder)
  encoder = place.params(encoder)
  vae_def, vae_params = nnx.split(pipe.vae)
  vae_params = place.params(vae_params)
  scheduler = make_scheduler(pipe.scheduler_config, 'ddim')
  shape = (*latent_size(pipe, None, None), pipe.unet.config['in_channels'])
  if np.shape(noise) != (len(seeds), *shape):
    raise ValueError(f'attack: noise of shape {np.shape(noise)}; give one {shape} latent per seed.')
  latents = jnp.tile(jnp.asarray(noise), (len(prompts[0]), 1, 1, 1))  # (J, …): attack j starts from seed j % S
  per_model = lambda a: a.reshape(models, jobs, *a.shape[1:])
  plain = per_model(encode_prompts(pipe, texts).context)
  uncond = encode_prompts(pipe, [''] * jobs).context
  guidance = jnp.float32(guidance_scale)

  def sample(shared, stacked, n, context):
    """Images and final latents of n models, each drawing its context (n, J·r, …) (placed) from the seeds' noise."""
    tile = lambda a: place.batch(jnp.tile(a, (context.shape[1] // jobs, *[1] * (a.ndim - 1))))
    return draw_images(unet_layout, shared, stacked, vae_def, vae_params, scheduler, steps, n, tile(latents),
                       context, tile(uncond), guidance)
  # The targets: the original model (one model) draws every model's prompts in one batch.
  targets, x0 = sample(params, {}, 1, place.batch(plain.reshape(1, models * jobs, *plain.shape[2:]), axis=1))

  table = encoder[esd.TOKEN_EMBEDDING]
  candidates = jnp.asarray(candidate_tokens(pipe.tokenizer, table.shape[0]))
  ids, slots = prefixed(pipe.tokenizer, texts, budget.tokens)
  k_tokens, k_steps = jax.random.split(key)
  tokens = jax.random.choice(k_tokens, candidates, (models * jobs, budget.tokens))  # the adversarial tokens' start
  ids = per_model(jnp.asarray(ids).at[:, 1:1 + budget.tokens].set(tokens))
  slots = place.attacks(per_model(jnp.asarray(slots))[..., None])
  embeds = place.attacks(table[ids])
  judge_def, judged = (None, None) if judge is None else (nnx.graphdef(judge), Judge(
      place.replicated(nnx.state(judge)), place.models(jnp.asarray(concepts, jnp.int32).reshape(models, 2))))
  fixed = dict(unet_layout=unet_layout, shared=shared, stacked=stacked, text_layout=text_layout, encoder=encoder,
               embeds=embeds, slots=slots, x0=place.attacks(per_model(x0[0])), scheduler=scheduler, vae_def=vae_def,
               vae_params=vae_params, latents=place.batch(latents), uncond=place.batch(uncond), guidance=guidance,
               judge_def=judge_def, judge=judged, models=models, mesh=place.mesh,
               budget=dataclasses.replace(budget, steps=0))  # a chunk's draws say how many: one compilation for all
  run = saved and {**identity(overlays, prompts, seeds, noise, budget, key, steps=steps,
                              guidance_scale=guidance_scale, concepts=concepts), **saved.run}
  state = place.attacks(start(budget, embeds))
  state, losses, done = (_resume(saved, run, state, place, budget.steps) if saved else
                         (state, np.zeros((models, 0), np.float32), 0))
  every = saved.every if saved else max(budget.steps, 1)
  with tqdm(total=budget.steps, initial=done, desc='attack', unit='step',
            disable=not (progress and distributed.is_main())) as bar:
    for first in range(done, budget.steps, every):
      count = min(every, budget.steps - first)
      draws = step_draws(k_steps, jnp.int32(first), count=count, jobs=jobs, latent_shape=shape,
                         num_train_timesteps=scheduler.num_train_timesteps)
      state, chunk = search(state=state, draws=Draws(*(place.batch(a, axis=1) for a in draws)), **fixed)
      losses = np.concatenate([losses, np.asarray(distributed.gather(chunk))], axis=1)
      if saved:
        _save(saved, run, state, losses, first + count)
      bar.update(count)
      bar.set_postfix(loss=f'{losses[:, -1].mean():.4g}')
  per_device = state.delta.sharding.shard_shape(state.delta.shape)[:2]
  log.info('attack: %d models × %d attacks on mesh %s, %d × %d per device', models, jobs,
           ' × '.join(f'{axis} {n}' for axis, n in place.mesh.shape.items()), *per_device)

  found = embeds + slots * state.delta
  discrete = jnp.where(slots[..., 0] > 0, project(found, table, candidates), ids)
  contexts = {'prompt': plain, 'continuous': encode_models(text_layout, encoder, found),
              'discrete': encode_models(text_layout, encoder, place.attacks(table[discrete]))}
  host = lambda a: np.asarray(distributed.gather(a))
  images = {name: host(sample(shared, stacked, models, place.attacks(ctx))[0]) for name, ctx in contexts.items()}
  discrete = host(discrete)
  decoded = [[pipe.tokenizer.decode(row[word_mask(pipe.tokenizer, row) > 0]) for row in model] for model in discrete]
  return Attack(prompts, seeds, decoded, discrete, losses, images, per_model(host(targets[0])))
