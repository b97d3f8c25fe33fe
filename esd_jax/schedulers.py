"""DDIM and PNDM (PLMS) samplers as pure, jit-able JAX, built from a diffusers `scheduler_config.json`.

API
---
`make_scheduler(config, kind=None, *, source=...) -> DDIM | PNDM`
    `config` is the scheduler_config.json dict. `kind=None` builds the class the config names (DDIMScheduler
    or PNDMScheduler); `kind='ddim'` / `'pndm'` re-interprets any scheduler's config (SD's PNDMScheduler,
    SDXL's EulerDiscreteScheduler, ...) the way diffusers' `DDIMScheduler.from_config(other.config)` does: the
    fields the target class has are taken over, the others dropped, missing ones get the target's defaults.
    `DDIM(config)` and `PNDM(config)` are the same as kind='ddim' / 'pndm'.

A scheduler is a frozen, hashable dataclass holding only config-derived numpy constants, so it is a static
value: close over it or pass it as a `static_argnums` argument. Everything that changes during sampling
lives in a state pytree that the caller carries.

    sched.timesteps(n) -> np.ndarray[int64]     the UNet timestep of each step for `n` inference steps; its
                                                length is the number of `step` calls (n for DDIM; n + 1 for
                                                PLMS, whose second timestep repeats, as in diffusers)
    sched.timestep(step_index, n) -> int32      the same, looked up with a traced index
    sched.init_state(sample) -> state           DDIM: () (stateless); PNDM: PLMSState (eps history, counter)
    sched.step(state, model_output, sample, step_index, n, ...) -> (prev_sample, state)
                                                one denoising step, `step_index` may be traced; DDIM takes
                                                keyword-only eta, noise, key, use_clipped_model_output
    sched.denoise(model_fn, sample, n, start=0, stop=None, state=None, key=None, **step_kwargs)
                                                -> (sample, state): steps start..stop-1 in one lax.fori_loop;
                                                `start`/`stop` may be traced (a partial loop of traced
                                                length, as a training loop needs);
                                                `model_fn(sample, t) -> model_output`
    sched.add_noise(x0, noise, t), sched.velocity(x0, noise, t)
                                                forward process and v-prediction target (t: int or int array
                                                broadcast over the leading axes)
    sched.scale_model_input(sample, t)          identity for both (kept for scheduler-agnostic loops)
    sched.init_noise_sigma (1.0), sched.alphas_cumprod (jnp float32), sched.prediction_type,
    sched.num_train_timesteps, sched.config (normalised config, defaults filled)

Numerics follow diffusers: betas, ᾱ = cumprod(1 - β) and final_alpha_cumprod are the float32 values
diffusers computes on CPU, bit for bit (torch.linspace's fused float32 arithmetic is reproduced, and torch
accumulates cumprod in float64 before rounding to float32; only zero-SNR rescaling may differ by an ulp, as
torch's vectorised sqrt is not always correctly rounded); timesteps are the same integers; each step is the
same float32 expression in the same order (XLA turns a division by a scalar into a multiplication by its
reciprocal: an ulp). Steps compute in float32 and return the sample's dtype.

A loop whose bounds are traced lowers to lax.while_loop, which is not reverse-differentiable; sampling in
ESD needs no gradients (a training step samples, then differentiates the UNet at the reached timestep).

Not implemented (configs asking for them raise ModelConfigError): PNDM's Runge-Kutta warm-up
(skip_prk_steps=False), dynamic thresholding (thresholding=True), other beta schedules.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from esd_jax.models.config import ModelConfigError, read_config

_SPACINGS = ('leading', 'trailing', 'linspace')
_BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')

# Fields every diffusers DDPM-family scheduler shares, with the defaults DDIM and PNDM give them.
_COMMON = {
    'num_train_timesteps': 1000, 'beta_start': 0.0001, 'beta_end': 0.02, 'beta_schedule': 'linear',
    'trained_betas': None, 'set_alpha_to_one': False, 'prediction_type': 'epsilon',
    'timestep_spacing': 'leading', 'steps_offset': 0,
}


@dataclasses.dataclass(frozen=True, eq=False)
class _Scheduler:
  """Shared noise schedule, timestep spacing and forward process of DDIM and PNDM."""

  config: Mapping[str, Any]
  source: dataclasses.InitVar[str] = 'scheduler_config.json'
  betas: np.ndarray = dataclasses.field(init=False, repr=False)
  _alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)
  final_alpha_cumprod: np.float32 = dataclasses.field(init=False, repr=False)

  CLASS_NAME: ClassVar[str]
  DEFAULTS: ClassVar[dict[str, Any]]
  SUPPORTED: ClassVar[dict[str, Any]]
  init_noise_sigma: ClassVar[float] = 1.0

  def __post_init__(self, source: str):
    config = read_config(self.CLASS_NAME, self._own_fields(self.config), self.DEFAULTS, self.SUPPORTED,
                         source=source)
    self._check(config, source)
    betas = _betas(config, source)
    if config.get('rescale_betas_zero_snr'):
      betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod(np.float32(1) - betas)
    final = np.float32(1) if config['set_alpha_to_one'] else alphas_cumprod[0]
    for name, value in (('config', types.MappingProxyType(config)), ('betas', betas),
                        ('_alphas_cumprod', alphas_cumprod), ('final_alpha_cumprod', final)):
      object.__setattr__(self, name, value)

  def _own_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` less the fields diffusers ignores when building this class from it: another class's config
    keeps only this class's fields (from_config), and a config of this class drops the sibling class's fields
    (SD 1.x PNDM configs carry clip_sample, SD 2.x DDIM configs carry skip_prk_steps). A config naming no
    class is read strictly as this class's."""
    if config.get('_class_name', self.CLASS_NAME) == self.CLASS_NAME:
      keep = lambda k: k in self.DEFAULTS or k not in _DDIM_FIELDS | _PNDM_FIELDS
    else:
      keep = lambda k: k in self.DEFAULTS
    return {k: v for k, v in config.items() if keep(k)}

  def _check(self, config: dict[str, Any], source: str):
    """Class-specific checks that need a custom message."""

  # Hashable by value so that equal configs share jit caches when the scheduler is a static argument.
  def _key(self):
    items = ((k, tuple(v) if isinstance(v, list) else v) for k, v in self.config.items())
    return type(self), tuple(sorted(items))

  def __eq__(self, other):
    return isinstance(other, _Scheduler) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def alphas_cumprod(self) -> jax.Array:
    return jnp.asarray(self._alphas_cumprod)

  @property
  def prediction_type(self) -> str:
    return self.config['prediction_type']

  @property
  def num_train_timesteps(self) -> int:
    return self.config['num_train_timesteps']

  def scale_model_input(self, sample: jax.Array, t=None) -> jax.Array:
    del t
    return sample

  def add_noise(self, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise; `t` is an int or an int array over x0's leading axes."""
    a = _expand(self.alphas_cumprod.astype(x0.dtype)[t], x0.ndim)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

  def velocity(self, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
    """The v-prediction target sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0 (diffusers' get_velocity)."""
    a = _expand(self.alphas_cumprod.astype(x0.dtype)[t], x0.ndim)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0

  def _spaced_timesteps(self, n: int) -> np.ndarray:
    """The n inference timesteps, descending, exactly as diffusers' set_timesteps spaces them."""
    steps = self.num_train_timesteps
    if not 1 <= n <= steps:
      raise ValueError(f'num_inference_steps = {n} must be between 1 and num_train_timesteps = {steps}.')
    spacing = self.config['timestep_spacing']
    if spacing == 'linspace':
      return np.linspace(0, steps - 1, n).round()[::-1].astype(np.int64)
    if spacing == 'leading':
      return (np.arange(0, n) * (steps // n)).round()[::-1].astype(np.int64) + self.config['steps_offset']
    # 'trailing' (diffusers ignores steps_offset for linspace and trailing spacing).
    return np.round(np.arange(steps, 0, -steps / n)).astype(np.int64) - 1

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    raise NotImplementedError

  def timestep(self, step_index, num_inference_steps: int) -> jax.Array:
    """The UNet timestep of step `step_index` (which may be traced), as int32."""
    return jnp.asarray(self.timesteps(num_inference_steps), jnp.int32)[step_index]

  def _alpha_prev(self, prev_t: jax.Array) -> jax.Array:
    """ᾱ at the previous timestep; final_alpha_cumprod past the start of the chain (prev_t < 0)."""
    return jnp.where(prev_t >= 0, self.alphas_cumprod[jnp.maximum(prev_t, 0)], self.final_alpha_cumprod)

  def init_state(self, sample: jax.Array):
    raise NotImplementedError

  def step(self, state, model_output, sample, step_index, num_inference_steps, **kwargs):
    raise NotImplementedError

  def denoise(self, model_fn: Callable[[jax.Array, jax.Array], jax.Array], sample: jax.Array,
              num_inference_steps: int, *, start=0, stop=None, state=None, key: jax.Array | None = None,
              **step_kwargs) -> tuple[jax.Array, Any]:
    """Runs steps start..stop-1 (stop defaults to the last step) in one lax.fori_loop.

    `start` and `stop` may be traced. `model_fn(sample, t)` returns the model output for the int32 timestep
    `t`. `state` continues an earlier partial loop (init_state(sample) when None). `key` (DDIM with eta > 0)
    is folded with the step index to draw each step's variance noise. Returns (sample, state).
    """
    stop = len(self.timesteps(num_inference_steps)) if stop is None else stop
    state = self.init_state(sample) if state is None else state

    def body(i, carry):
      x, st = carry
      out = model_fn(x, self.timestep(i, num_inference_steps))
      kwargs = dict(step_kwargs, key=jax.random.fold_in(key, i)) if key is not None else step_kwargs
      return self.step(st, out, x, i, num_inference_steps, **kwargs)

    return jax.lax.fori_loop(start, stop, body, (sample, state))


@dataclasses.dataclass(frozen=True, eq=False)
class DDIM(_Scheduler):
  """diffusers' DDIMScheduler: deterministic (eta = 0) or stochastic (eta > 0) DDIM steps."""

  CLASS_NAME: ClassVar[str] = 'DDIMScheduler'
  DEFAULTS: ClassVar[dict[str, Any]] = {
      **_COMMON, 'clip_sample': True, 'set_alpha_to_one': True, 'thresholding': False,
      'dynamic_thresholding_ratio': 0.995, 'clip_sample_range': 1.0, 'sample_max_value': 1.0,
      'rescale_betas_zero_snr': False,
  }
  SUPPORTED: ClassVar[dict[str, Any]] = {
      'beta_schedule': _BETA_SCHEDULES, 'timestep_spacing': _SPACINGS,
      'prediction_type': ('epsilon', 'v_prediction', 'sample'),
  }

  def _check(self, config, source):
    if config['thresholding']:
      raise ModelConfigError(f'{source}: DDIMScheduler.thresholding = True (dynamic thresholding, for pixel-space '
                        'models) is not implemented in esd-jax; set it to false.')

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    return self._spaced_timesteps(num_inference_steps)

  def init_state(self, sample: jax.Array) -> tuple[()]:
    del sample
    return ()

  def step(self, state: tuple[()], model_output: jax.Array, sample: jax.Array, step_index,
           num_inference_steps: int, *, eta=0.0, noise: jax.Array | None = None, key: jax.Array | None = None,
           use_clipped_model_output: bool = False) -> tuple[jax.Array, tuple[()]]:
    """x_{t-1} from x_t = `sample` and the model output at step `step_index` (diffusers DDIMScheduler.step).

    With eta != 0 the variance noise is `noise`, or drawn from `key` (standard normal); one of them is
    required. `eta` may be traced. The result has `sample`'s dtype.
    """
    if noise is not None and key is not None:
      raise ValueError('DDIM.step: pass either `noise` or `key`, not both.')
    if key is not None:
      noise = jax.random.normal(key, sample.shape, sample.dtype)
    if noise is None and not (isinstance(eta, int | float) and eta == 0):
      raise ValueError(f'DDIM.step with eta = {eta} needs variance noise: pass `noise=` or `key=`.')
    t = self.timestep(step_index, num_inference_steps)
    # diffusers steps back by num_train_timesteps // n whatever the spacing, not to the next listed timestep.
    prev_t = t - self.num_train_timesteps // num_inference_steps
    a_t, a_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
    b_t = 1 - a_t
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if self.prediction_type == 'epsilon':
      x0, eps = (x - jnp.sqrt(b_t) * out) / jnp.sqrt(a_t), out
    elif self.prediction_type == 'sample':
      x0 = out
      eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    else:
      x0, eps = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * out, jnp.sqrt(a_t) * out + jnp.sqrt(b_t) * x
    if self.config['clip_sample']:
      x0 = jnp.clip(x0, -self.config['clip_sample_range'], self.config['clip_sample_range'])
    variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
      eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if noise is not None:
      prev = prev + std * noise.astype(jnp.float32)
    return prev.astype(sample.dtype), state


class PLMSState(NamedTuple):
  """PLMS history: the last four model outputs (newest last), the step counter, and x_t of the first step,
  to which the second step (a Heun-like correction with the averaged output) returns."""

  ets: jax.Array
  counter: jax.Array
  cur_sample: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class PNDM(_Scheduler):
  """diffusers' PNDMScheduler with skip_prk_steps=True: pseudo linear multistep (PLMS) sampling."""

  CLASS_NAME: ClassVar[str] = 'PNDMScheduler'
  DEFAULTS: ClassVar[dict[str, Any]] = {**_COMMON, 'skip_prk_steps': False}
  SUPPORTED: ClassVar[dict[str, Any]] = {
      'beta_schedule': _BETA_SCHEDULES, 'timestep_spacing': _SPACINGS,
      'prediction_type': ('epsilon', 'v_prediction'),
  }

  def _check(self, config, source):
    if not config['skip_prk_steps']:
      raise ModelConfigError(f'{source}: PNDMScheduler.skip_prk_steps = False asks for the Runge-Kutta (PRK) '
                        'warm-up steps, which esd-jax does not implement; set skip_prk_steps to true (PLMS '
                        'only, as Stable Diffusion does) or use DDIM (kind="ddim").')

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    ts = self._spaced_timesteps(num_inference_steps)[::-1]
    # diffusers' PLMS list: the second timestep repeats (the second step redoes the first one, see step).
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)

  def init_state(self, sample: jax.Array) -> PLMSState:
    return PLMSState(ets=jnp.zeros((4, *sample.shape), sample.dtype), counter=jnp.zeros((), jnp.int32),
                     cur_sample=jnp.zeros_like(sample))

  def step(self, state: PLMSState, model_output: jax.Array, sample: jax.Array, step_index,
           num_inference_steps: int) -> tuple[jax.Array, PLMSState]:
    """x_{t-δ} from x_t = `sample` (diffusers PNDMScheduler.step_plms); the counter in `state` decides the
    multistep order, so a loop may start at any step index with a fresh state, as diffusers allows."""
    c = state.counter
    ratio = self.num_train_timesteps // num_inference_steps
    t = self.timestep(step_index, num_inference_steps)
    model_output = model_output.astype(sample.dtype)
    # Step 1 (the repeated timestep) does not push its output: it averages it with step 0's and redoes step 0
    # from step 0's sample.
    second = c == 1
    t, prev_t = jnp.where(second, t + ratio, t), jnp.where(second, t, t - ratio)
    ets = jnp.where(second, state.ets, jnp.concatenate([state.ets[1:], model_output[None]]))
    x = jnp.where(second, state.cur_sample, sample)
    cur_sample = jnp.where(c == 0, sample, state.cur_sample)
    eps = jax.lax.switch(jnp.minimum(c, 4), _PLMS_COMBINATIONS, model_output, ets[3], ets[2], ets[1], ets[0])
    prev = self._prev_sample(x, t, prev_t, eps)
    return prev, PLMSState(ets=ets, counter=c + 1, cur_sample=cur_sample)

  def _prev_sample(self, sample, t, prev_t, model_output):
    """Formula (9) of the PNDM paper, as diffusers' _get_prev_sample computes it."""
    a_t, a_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if self.prediction_type == 'v_prediction':
      out = jnp.sqrt(a_t) * out + jnp.sqrt(b_t) * x
    sample_coeff = jnp.sqrt(a_prev / a_t)
    denom = a_t * jnp.sqrt(b_prev) + jnp.sqrt(a_t * b_t * a_prev)
    return (sample_coeff * x - (a_prev - a_t) * out / denom).astype(sample.dtype)


# Model output to step with, by counter (4: every later step), given the history newest first. Step 1 averages
# with step 0's output; later steps are Adams-Bashforth of the order the history allows, written as diffusers
# writes them (same float32 rounding). Module-level functions so that eager lax.switch calls hit its cache.
_PLMS_COMBINATIONS = (
    lambda out, e1, e2, e3, e4: out,
    lambda out, e1, e2, e3, e4: (out + e1) / 2,
    lambda out, e1, e2, e3, e4: (3 * e1 - e2) / 2,
    lambda out, e1, e2, e3, e4: (23 * e1 - 16 * e2 + 5 * e3) / 12,
    lambda out, e1, e2, e3, e4: (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
)

_KINDS: dict[str, type[_Scheduler]] = {'ddim': DDIM, 'pndm': PNDM}
_DDIM_FIELDS, _PNDM_FIELDS = frozenset(DDIM.DEFAULTS), frozenset(PNDM.DEFAULTS)


def make_scheduler(config: Mapping[str, Any], kind: str | None = None, *,
                   source: str = 'scheduler_config.json') -> DDIM | PNDM:
  """The scheduler a diffusers scheduler config describes, or (with `kind`) its re-interpretation as DDIM or
  PNDM, as diffusers' `DDIMScheduler.from_config(other.config)` builds it."""
  by_class = {cls.CLASS_NAME: cls for cls in _KINDS.values()}
  class_name = config.get('_class_name')
  if kind is None:
    if class_name not in by_class:
      what = 'names no scheduler class (no "_class_name")' if class_name is None else (
          f'describes {class_name}, which esd-jax does not implement (supported: {sorted(by_class)})')
      raise ModelConfigError(f'{source} {what}. Pass kind="ddim" or kind="pndm" to sample with its noise '
                        'schedule.')
    cls = by_class[class_name]
  elif kind in _KINDS:
    cls = _KINDS[kind]
  else:
    raise ValueError(f'kind = {kind!r} is not a scheduler esd-jax implements; use None, "ddim" or "pndm".')
  return cls(config, source=source)


def _betas(config: Mapping[str, Any], source: str) -> np.ndarray:
  """β in float32, as diffusers computes them."""
  steps = config['num_train_timesteps']
  if config['trained_betas'] is not None:
    betas = np.asarray(config['trained_betas'], np.float32)
    if betas.shape != (steps,):
      raise ModelConfigError(f'{source}: trained_betas has shape {betas.shape} but num_train_timesteps = {steps}; '
                        'they must agree.')
    return betas
  schedule, start, end = config['beta_schedule'], config['beta_start'], config['beta_end']
  if schedule == 'linear':
    return _torch_linspace_f32(start, end, steps)
  if schedule == 'scaled_linear':
    return _torch_linspace_f32(start**0.5, end**0.5, steps)**2
  # squaredcos_cap_v2: the cosine ᾱ(t) of improved DDPM, discretised in float64, β capped at 0.999.
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2)**2
  return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
                  np.float32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps, dtype=float32) on CPU, bit for bit: a float32 step, filled from both
  ends with fused multiply-adds (an exact float64 product and sum rounded once to float32)."""
  start, end = np.float32(start), np.float32(end)
  step = np.float32((end - start) / np.float32(max(steps - 1, 1)))
  i = np.arange(steps)
  head = np.float64(start) + np.float64(step) * i
  tail = np.float64(end) - np.float64(step) * (steps - 1 - i)
  return np.where(i < steps // 2, head, tail).astype(np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
  """torch.cumprod of a float32 CPU tensor: accumulated in float64, each partial product rounded to
  float32."""
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """diffusers' rescale_zero_terminal_snr (Lin et al. 2023, Algorithm 1) in the same float32 operations."""
  alphas_bar_sqrt = np.sqrt(_cumprod(np.float32(1) - betas))
  first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return (np.float32(1) - alphas).astype(np.float32)


def _expand(coeff: jax.Array, ndim: int) -> jax.Array:
  """Per-example coefficients (shape of t) broadcast over the trailing axes of an ndim-dimensional array."""
  return coeff.reshape(coeff.shape + (1,) * (ndim - coeff.ndim))
