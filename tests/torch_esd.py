"""An independent PyTorch reference for ONE ESD training step, written from docs/method.md (the method as the authors' code runs it) alone.

Parity tests compare the JAX trainer against this: two implementations of the same spec written apart, so a
mismatch points at a mistake in one of them. Everything runs in fp32 on a diffusers UNet2DConditionModel.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel

CONVENTIONS = ('paper', 'diffusers-v1', 'diffusers-v2')
SAMPLERS = {'ddim': DDIMScheduler, 'pndm': PNDMScheduler}

# Modules that turn features back into the output and the time embedding: CompVis `noxattn` and `notime` keep
# them frozen (CompVis names `out.*` and `time_embed.*`; their diffusers names below).
_OUTPUT_AND_TIME = ('time_embedding.', 'conv_norm_out.', 'conv_out.')


def _inside(name: str, *blocks: str) -> bool:
  return any(name.startswith(block + '.') for block in blocks)


TRAIN_METHODS: dict[str, Callable[[str], bool]] = {
    'esd-x': lambda name: 'attn2' in name,
    'esd-u': lambda name: 'attn2' not in name and not name.startswith(_OUTPUT_AND_TIME),
    'esd-x-strict': lambda name: 'attn2.to_k' in name or 'attn2.to_v' in name,
    'esd-self': lambda name: 'attn1' in name,
    'esd-all': lambda name: True,
    'notime': lambda name: not name.startswith(_OUTPUT_AND_TIME),
    'xlayer': lambda name: 'attn2' in name and _inside(name, 'up_blocks.2.attentions.0',
                                                       'up_blocks.2.attentions.2'),
    'selflayer': lambda name: 'attn1' in name and _inside(name, 'down_blocks.1.attentions.0',
                                                          'down_blocks.2.attentions.0'),
}
"""docs/method.md §3: which diffusers UNet parameter names each method trains."""


def _tensor(a) -> torch.Tensor:
  if isinstance(a, torch.Tensor):
    return a.detach().to(torch.float32).clone()
  return torch.from_numpy(np.array(a, np.float32))


def _eps(model: UNet2DConditionModel, x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
  return model(x, int(t), encoder_hidden_states=emb).sample


def _guided_eps(model, x, t, cond, uncond, guidance: float) -> torch.Tensor:
  # Unconditional first in the batch, as both the CompVis sampler and the diffusers pipelines order it.
  e_u, e_c = _eps(model, torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
  return e_u + guidance * (e_c - e_u)


def compvis_alphas_cumprod(config) -> torch.Tensor:
  """ᾱ as CompVis registers it: β = linspace(√β_start, √β_end, T)² and the product in float64, then fp32."""
  betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                      dtype=np.float64) ** 2
  return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def compvis_ddim_timesteps(config, num_steps: int) -> np.ndarray:
  """CompVis 'uniform' DDIM timesteps: range(0, T, T // S) + 1, i.e. [1, 21, …, 981] for 50 steps."""
  return np.arange(0, config.num_train_timesteps, config.num_train_timesteps // num_steps) + 1


def sample_paper(model, config, num_steps: int, x, cond, uncond, guidance: float, t_enc: int) -> torch.Tensor:
  """The CompVis DDIM walk (η_ddim = 0) of ESD's paper code, stopped early at t_enc (docs/method.md §2 `paper`)."""
  alphas_cumprod = compvis_alphas_cumprod(config)
  ddim_t = compvis_ddim_timesteps(config, num_steps)
  alphas = alphas_cumprod[ddim_t]
  alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_t[:-1]]])
  # ESD calls the sampler with t_start = -1, which drops the last DDIM timestep: the walk starts at ddim_t[-2]
  # (961 for 50 steps), 49 steps in all.
  walk = ddim_t[:-1]
  for i, t in enumerate(walk[::-1]):
    index = len(walk) - i - 1
    e = _guided_eps(model, x, t, cond, uncond, guidance)
    a_t, a_prev = alphas[index], alphas_prev[index]
    pred_x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
    x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e
    if index + 1 == t_enc:
      break
  return x


def sample_scheduler(model, scheduler, timesteps, x, cond, uncond, guidance: float) -> torch.Tensor:
  """The diffusers pipeline loop over `timesteps` (DDIM with η = 0, or PNDM/PLMS), guided on `cond`."""
  for t in timesteps:
    e = _guided_eps(model, scheduler.scale_model_input(x, t), t, cond, uncond, guidance)
    x = scheduler.step(e, t, x).prev_sample
  return x


def _scheduler(scheduler_config: dict, sampler: str, num_steps: int):
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler {sampler!r} is unknown: use one of {sorted(SAMPLERS)}')
  scheduler = SAMPLERS[sampler].from_config(scheduler_config)
  scheduler.set_timesteps(num_steps)
  return scheduler


def _query_timesteps(convention: str, config, scheduler, num_steps: int, step_index: int) -> range:
  """The query timesteps docs/method.md §2/§4 allow at this step index; raises if the step index is out of range."""
  T = config.num_train_timesteps
  last = {'paper': num_steps - 1, 'diffusers-v1': num_steps - 2, 'diffusers-v2': num_steps - 1}[convention]
  first = 1 if convention == 'diffusers-v1' else 0
  if not first <= step_index <= last:
    raise ValueError(f'step_index {step_index} is out of range for convention {convention!r} with '
                     f'{num_steps} steps: draw it from {{{first}..{last}}}')
  if convention == 'paper':
    return range(round(step_index / num_steps * T), round((step_index + 1) / num_steps * T))
  if convention == 'diffusers-v1':
    # The demo re-sets the scheduler to 1000 steps and indexes its timesteps [1000, 999, …] at 20k.
    t = T - int(step_index / num_steps * T)
  else:
    t = int(scheduler.timesteps[step_index])
  return range(t, t + 1)


def esd_step(unet: UNet2DConditionModel, scheduler_config: dict, *, convention: str, x_T, step_index: int,
             query_t: int, concept_emb, uncond_emb, erase_from_emb=None, eta: float = 1.0,
             guidance: float = 3.0, num_ddim_steps: int = 50, trained: list[str], lr: float = 1e-5,
             sampler: str = 'ddim', teacher: UNet2DConditionModel | None = None, retain_emb=None,
             preserve_weight: float = 1.0) -> dict:
  """One ESD iteration: sample x_t, build the negatively guided target with the frozen θ*, take one Adam step
  on the `trained` tensors of θ = `unet` (updated in place, as the training loop would).

  convention: 'paper' (CompVis DDIM, step_index = t_enc ∈ {0..S−1}, query_t ∈ 20·t_enc + {0..19}),
    'diffusers-v1' (DDIMScheduler, step_index = k ∈ {1..S−2}, query_t = 1000 − 20k) or 'diffusers-v2'
    (the frozen model samples with `sampler` 'ddim' or 'pndm', step_index = k ∈ {0..S−1},
    query_t = timesteps[k]); see docs/method.md §2 and §4. A query_t the convention does not allow raises.
  eta: the paper's negative guidance η in every convention ('diffusers-v2' uses η_C = η + 1 internally).
  retain_emb: a prompt r to preserve (docs/method.md §5): x_r is sampled for r exactly as x_t is for the student's
    prompt, from the same x_T, and the loss adds preserve_weight · mse(ε_θ(x_r, r, t), ε*(x_r, r, t)).
  teacher: θ*; a deep copy of `unet` taken before the step when None. A different one lets a test tell
    which model samples; the 'paper' and 'diffusers-v1' conventions sample with θ, 'diffusers-v2' with θ*.
  Embeddings are (1 or B, L, D) arrays; x_T is the (B, C, H, W) initial noise. 'paper' reads only β_start,
  β_end, the number of training timesteps, the β schedule and the prediction type from scheduler_config:
  CompVis always offsets its DDIM timesteps by 1 and uses ᾱ[0] as the last ᾱ_prev.

  Returns dict(loss: float, x_t: NCHW array, target: NCHW array, grads and params_after: {name: array} for
  every trained tensor).
  """
  if convention not in CONVENTIONS:
    raise ValueError(f'convention {convention!r} is unknown: use one of {CONVENTIONS}')
  if convention != 'diffusers-v2' and sampler != 'ddim':
    raise ValueError(f"sampler {sampler!r} applies to convention 'diffusers-v2' only; the {convention!r} "
                     "convention always samples with DDIM: leave sampler='ddim'")
  params = dict(unet.named_parameters())
  trained = list(dict.fromkeys(trained))
  unknown = sorted(set(trained) - set(params))
  if not trained or unknown:
    raise ValueError(f'trained must name UNet parameters (diffusers state-dict names, e.g. selected with '
                     f'TRAIN_METHODS); {"it is empty" if not trained else f"unknown: {unknown[:5]}"}')
  scheduler = _scheduler(scheduler_config, sampler, num_ddim_steps) if convention != 'paper' else None
  config = (DDIMScheduler.from_config(scheduler_config) if scheduler is None else scheduler).config
  compvis = config.beta_schedule == 'scaled_linear' and config.prediction_type == 'epsilon'
  if convention == 'paper' and not compvis:
    raise ValueError("convention 'paper' is CompVis' ε-prediction DDIM on the scaled_linear β schedule; got "
                     f'beta_schedule={config.beta_schedule!r}, prediction_type={config.prediction_type!r}')
  allowed = _query_timesteps(convention, config, scheduler, num_ddim_steps, step_index)
  if query_t not in allowed:
    raise ValueError(f'query_t {query_t} does not match convention {convention!r} at step_index {step_index}:'
                     f' draw it from [{allowed.start}, {allowed.stop - 1}]')

  x = _tensor(x_T)
  c, u, f = (None if e is None else _tensor(e).expand(x.shape[0], -1, -1)
             for e in (concept_emb, uncond_emb, erase_from_emb))
  if f is not None and torch.equal(f, c):
    f = None  # docs/method.md §1: erasing c from f = c is plain erasure, with the "" anchor.
  # The student sees f when erasing from f. The sampling prompt is the student's prompt too (f if given, else
  # c): so the 2025 code does; the demo line (diffusers-v1) sampled with c even when f was given.
  student_emb = c if f is None else f
  teacher = copy.deepcopy(unet) if teacher is None else teacher

  r = None if retain_emb is None else _tensor(retain_emb).expand(x.shape[0], -1, -1)

  def sample(prompt_emb):
    if convention == 'paper':
      return sample_paper(unet, config, num_ddim_steps, x, prompt_emb, u, guidance, step_index)
    if scheduler is not None:
      scheduler.set_timesteps(num_ddim_steps)  # a fresh walk: PNDM keeps state between calls
    sampling_model = unet if convention == 'diffusers-v1' else teacher
    return sample_scheduler(sampling_model, scheduler, scheduler.timesteps[:step_index], x, prompt_emb, u, guidance)

  with torch.no_grad():
    x_t = sample(student_emb)
    if r is not None:
      x_r = sample(r)
      target_r = _eps(teacher, x_r, query_t, r)
    e_c, e_u = _eps(teacher, x_t, query_t, c), _eps(teacher, x_t, query_t, u)
    if convention == 'diffusers-v2':
      anchor = e_c if f is None else _eps(teacher, x_t, query_t, f)
      target = anchor - (eta + 1) * (e_c - e_u)
    else:
      anchor = e_u if f is None else _eps(teacher, x_t, query_t, f)
      target = anchor - eta * (e_c - e_u)

  requires_grad = {name: p.requires_grad for name, p in params.items()}
  trained_names = set(trained)
  try:
    for name, p in params.items():
      p.requires_grad_(name in trained_names)
    optimizer = torch.optim.Adam([params[n] for n in trained], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0)
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
      loss = F.mse_loss(_eps(unet, x_t, query_t, student_emb), target)
      if r is not None:
        loss = loss + preserve_weight * F.mse_loss(_eps(unet, x_r, query_t, r), target_r)
      loss.backward()
    grads = {n: params[n].grad.detach().numpy().copy() for n in trained}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  finally:
    for name, p in params.items():
      p.requires_grad_(requires_grad[name])
  return dict(loss=float(loss), x_t=x_t.numpy(), target=target.numpy(), grads=grads,
              params_after={n: params[n].detach().numpy().copy() for n in trained})
