"""How deep is an erasure, on the shapes world: the attack's success judged by the classifier, and three probes of
shallow erasure (docs/method.md §9), each a number per model:

- handoff: the original model denoises the concept's prompt to step k, the erased model finishes; is the concept
  there, for k along the trajectory? (An erasure that only redirects the first steps gives it back for small k.)
- guidance: the concept's prompts drawn by the erased model under stronger classifier-free guidance.
- forms: the concept named in other prompt forms than the one trained on.

All draw from seeds 0…n−1 (the attack and the handoff from evaluate's noise, measure.initial_latents; the guidance
and forms probes from generate's, text_to_image_models) and count an image the judge calls 'none' as not showing
the concept, as every report of this project does.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from esd_jax import distributed
from esd_jax.attack import Attack, Budget, Placement, Saved, run_attack
from esd_jax.generate import Conditioning, _images, encode_prompts, latent_size, overlay_stack, text_to_image_models
from esd_jax.models.state_dict import ParamLayout, split_flat
from esd_jax.pipeline import StableDiffusion
from esd_jax.schedulers import make_scheduler
from esd_jax.shapes_world import classifier, world
from esd_jax.shapes_world.measure import initial_latents


def shown(judge, images: np.ndarray, concept: str) -> np.ndarray:
  """Whether each image (…, H, W, 3) shows `concept` (one shape or one colour of the world), as the judge sees it."""
  shape, colour = world.parse(concept)
  if not world.is_concept(concept):
    raise ValueError(f'{concept!r} is not one shape or one colour of the shapes world; the judge tells '
                     f'{world.SHAPES + world.COLOUR_NAMES}.')
  shape_ids, colour_ids = classifier.predict(judge, images.reshape(-1, *images.shape[-3:]))[:2]
  seen = shape_ids == shape if shape is not None else colour_ids == colour
  return seen.reshape(images.shape[:-3])


def concept_prompts(concept: str) -> list[str]:
  """The shapes world's evaluation prompts that name `concept`: what the attack attacks by default."""
  return [p for p in world.PROMPTS if concept in p.split()]


def default_forms(concept: str) -> list[str]:
  """Prompt forms of `concept` other than the bare word ESD trains on and the "a {colour} {shape}" the evaluation
  asks: with an article, a generic noun, repeated, reordered, and the plural (a word the world never captioned)."""
  return [concept, f'a {concept}', f'{concept} shape', f'a {concept} shape', f'{concept} {concept}',
          f'shape {concept}', f'{concept}s']


def success(judge, attack: Attack, concepts: Sequence[str]) -> dict[str, np.ndarray]:
  """Per kind of prompt ('prompt', 'continuous', 'discrete'), the share of model m's attacks (prompts × seeds)
  whose image shows concepts[m]: (M,) attack success rates."""
  return {kind: np.asarray([shown(judge, images[m], c).mean() for m, c in enumerate(concepts)])
          for kind, images in attack.images.items()}


@functools.partial(jax.jit, static_argnames=('layout', 'vae_def', 'scheduler', 'steps', 'models'))
def _handoff(layout: ParamLayout, params, stacked, vae_def, vae_params, scheduler, steps: int, models: int, latents,
             context, uncond, guidance, k):
  """Images (M, J, …) from `latents` (J, …): the original UNet for sampler steps 0 … k−1, then model m's (params
  with stacked[·][m] laid over them), each model conditioned on its own context[m] (J, L, D)."""
  original = layout.module(params)
  # Sampler step i runs at timestep(i), decreasing in i: steps before k are those above step k's timestep.
  switch = jnp.where(k < steps, scheduler.timestep(jnp.minimum(k, steps - 1), steps), -1)

  def one_model(overlay, context):
    erased = layout.module({**params, **overlay})
    unet = lambda x, t, context, added: jax.lax.cond(t > switch, original, erased, x, t, context, added)
    return _images(unet, nnx.merge(vae_def, vae_params), scheduler, steps, latents, Conditioning(context), uncond,
                   guidance, 0.0, None, jnp.float32)[0]
  return jax.vmap(one_model, axis_size=models)(stacked, context)


def handoff(judge, pipe: StableDiffusion, overlays: Sequence[Mapping[str, jax.Array]], concepts: Sequence[str],
            prompts: Sequence[Sequence[str]], seeds: Sequence[int], ks: Sequence[int], *, steps: int = 50,
            guidance_scale: float = 7.5, placement: Placement | None = None, progress: bool = False
            ) -> list[dict[int, float]]:
  """Per model m (`overlays[m]`, held layout), {k: share of its prompts[m] × seeds showing concepts[m]} when the
  original model denoises to step k and model m finishes; k = 0 is model m alone, k = steps the original alone. All
  models in one jitted batch per k, placed as the attack places them."""
  place = placement or Placement.one_device()
  models, jobs = len(overlays), len(prompts[0]) * len(seeds)
  place.check(models, jobs)
  layout, params = split_flat(pipe.unet)
  params = place.params(params)
  stacked = place.stacked(overlay_stack(params, overlays)[1])
  vae_def, vae_params = nnx.split(pipe.vae)
  vae_params = place.params(vae_params)
  scheduler = make_scheduler(pipe.scheduler_config, 'ddim')
  latents = place.batch(jnp.tile(jnp.asarray(seed_noise(pipe, seeds)), (len(prompts[0]), 1, 1, 1)))
  texts = [p for model in prompts for p in model for _ in seeds]
  context = encode_prompts(pipe, texts).context
  context = place.attacks(context.reshape(models, jobs, *context.shape[1:]))
  uncond = Conditioning(place.batch(encode_prompts(pipe, [''] * jobs).context))
  rates = [{} for _ in overlays]
  for k in tqdm(ks, desc='handoff', unit='k', leave=False, disable=not (progress and distributed.is_main())):
    images = _handoff(layout, params, stacked, vae_def, vae_params, scheduler, steps, models, latents,
                      context, uncond, jnp.float32(guidance_scale), jnp.int32(k))
    images = np.asarray(distributed.gather(images))
    for m, concept in enumerate(concepts):
      rates[m][int(k)] = float(shown(judge, images[m], concept).mean())
  return rates


def under_prompts(judge, pipe: StableDiffusion, overlays: Sequence[Mapping[str, jax.Array]],
                  concepts: Sequence[str], prompts: Sequence[Sequence[str]], seeds: Sequence[int], *,
                  steps: int = 50, guidance_scale: float = 7.5) -> list[dict[str, float]]:
  """Per model m, {prompt: share of seeds whose image shows concepts[m]} for its prompts[m], all models in one jitted
  batch (text_to_image_models: generate's noise)."""
  every = list(dict.fromkeys(p for model in prompts for p in model))
  images = text_to_image_models(pipe, list(overlays), every, list(seeds), num_inference_steps=steps,
                                guidance_scale=guidance_scale)  # (models, seeds, prompts, …)
  return [{p: float(shown(judge, images[m, :, every.index(p)], c).mean()) for p in prompts[m]}
          for m, c in enumerate(concepts)]


def seed_noise(pipe: StableDiffusion, seeds: Sequence[int]) -> np.ndarray:
  """Each seed's initial latents, as evaluate draws them (measure.initial_latents)."""
  return initial_latents((*latent_size(pipe, None, None), pipe.unet.config['in_channels']), seeds)


def judged_concept(concept: str) -> tuple[int, int]:
  """(head, label) of the judge that says whether an image shows `concept`: head 0 names shapes, 1 colours."""
  shape, colour = world.parse(concept)
  return (0, shape) if shape is not None else (1, colour)


def attack_and_probe(judge, pipe: StableDiffusion, models: Sequence[tuple[str, Mapping[str, jax.Array], str]],
                     prompts: Sequence[Sequence[str]], seeds: Sequence[int], budget: Budget, *, key: jax.Array,
                     handoff_steps: Sequence[int], guidance: Sequence[float], forms: Sequence[str] = (),
                     steps: int = 50, guidance_scale: float = 7.5, placement: Placement | None = None,
                     saved: Saved | None = None, progress: bool = False) -> tuple[list[dict], Attack]:
  """Attacks every model (name, overlay, concept) on its prompts × seeds in one search (run_attack, with `placement`,
  `saved` and `progress`; the classifier objective maximises this judge's view of each model's concept) and returns
  depth_report's rows and the attack."""
  for _, _, concept in models:
    shown(judge, np.ones((1, 64, 64, 3), np.float32), concept)  # refuses a concept the judge cannot tell, up front
  found = run_attack(pipe, [dict(o) for _, o, _ in models], prompts, seeds, seed_noise(pipe, seeds), budget, key=key,
                     steps=steps, guidance_scale=guidance_scale, judge=judge,
                     concepts=[judged_concept(c) for _, _, c in models], placement=placement, saved=saved,
                     progress=progress)
  return depth_report(judge, pipe, models, found, handoff_steps=handoff_steps, guidance=guidance, forms=forms,
                      steps=steps, guidance_scale=guidance_scale, placement=placement, progress=progress), found


def depth_report(judge, pipe: StableDiffusion, models: Sequence[tuple[str, Mapping[str, jax.Array], str]],
                 attack: Attack, *, handoff_steps: Sequence[int], guidance: Sequence[float],
                 forms: Sequence[str] = (), steps: int = 50, guidance_scale: float = 7.5,
                 placement: Placement | None = None, progress: bool = False) -> list[dict]:
  """Per model (name, overlay, concept), attacked in `attack` (in this order): the attack success rates, the prompts
  found, the search's loss, and the three probes on its concept's prompts (forms: `forms`, or default_forms), each
  probe's models in one jitted batch. `progress`: a bar over the probes (process 0's)."""
  concepts = [c for _, _, c in models]
  overlays = [dict(o) for _, o, _ in models]
  rates = success(judge, attack, concepts)
  seeds = attack.seeds
  with tqdm(total=len(guidance) + 2, desc='probes', unit='probe', disable=not (progress and distributed.is_main())
            ) as bar:
    at = {}
    for g in guidance:
      at[g] = under_prompts(judge, pipe, overlays, concepts, attack.prompts, seeds, steps=steps, guidance_scale=g)
      bar.update()
    worded = under_prompts(judge, pipe, overlays, concepts, [list(forms) or default_forms(c) for c in concepts],
                           seeds, steps=steps, guidance_scale=guidance_scale)
    bar.update()
    handed = handoff(judge, pipe, overlays, concepts, attack.prompts, seeds, handoff_steps, steps=steps,
                     guidance_scale=guidance_scale, placement=placement, progress=progress)
    bar.update()
  report = []
  for m, (name, _, concept) in enumerate(models):
    found = {}
    for text in attack.texts[m]:
      found[text] = found.get(text, 0) + 1
    report.append({
        'name': name, 'concept': concept, 'prompts': attack.prompts[m],
        'attack_success': {kind: float(r[m]) for kind, r in rates.items()},
        'found': dict(sorted(found.items(), key=lambda kv: -kv[1])),
        # None for a search of no steps (the unoptimised prefix)
        'search_loss': {'first': float(attack.losses[m, 0]), 'last': float(attack.losses[m, -1])}
                       if attack.losses.shape[1] else None,
        'handoff': handed[m],
        'guidance': {str(g): float(np.mean(list(at[g][m].values()))) for g in guidance},
        'forms': worded[m]})
  return report


def attack_grid(attack: Attack, names: Sequence[str], grid_seeds: int) -> tuple[list[list[np.ndarray]], list[str],
                                                                                    list[str]]:
  """(rows, row labels, column labels) of the attack's images: per model, its targets (the original model's), the
  prompt as given, the continuous and the discrete attack; columns: each prompt's first grid_seeds seeds."""
  n = len(attack.seeds)
  columns = [i * n + s for i in range(len(attack.prompts[0])) for s in range(min(grid_seeds, n))]
  rows, labels = [], []
  for m, name in enumerate(names):
    for kind, images in (('target', attack.targets), *attack.images.items()):
      rows.append([images[m, j] for j in columns])
      labels.append(f'{name}: {kind}')
  col_labels = [f'#{i + 1} seed {attack.seeds[s]}' for i in range(len(attack.prompts[0]))
                for s in range(min(grid_seeds, n))]
  return rows, labels, col_labels
