"""An independent PyTorch reference for the attack's two objectives and their gradients (docs/method.md §9), written
from the method's description on diffusers' and transformers' own modules: the adversarial word embeddings enter the
text encoder through a forward hook on its token-embedding layer, as a leaf tensor whose gradient torch computes.
The denoise objective is UnlearnDiffAtk's; the classifier objective samples with diffusers' DDIMScheduler, decodes
with diffusers' VAE and asks a torch twin of the shapes classifier. Everything in fp32."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def attack_loss_and_grad(text_encoder, unet, alphas_cumprod, *, ids, slots, adversarial, x0, t, noise) -> dict:
  """The summed per-image denoising loss Σ_j mean((ε(√ᾱ_t x₀ + √(1−ᾱ_t) n, t, c_j) − n)²) of prompts `ids` (J, L) whose
  word embeddings at `slots` (J, L, bool) are replaced by `adversarial` (J, L, D), and its gradient with respect to
  those embeddings (zero outside the slots). Latents x0, noise: (J, C, H, W); t: each image's timestep (J,)."""
  with torch.enable_grad():  # whatever the caller's mode (a loaded pipeline may leave gradients off)
    return _loss_and_grad(text_encoder, unet, alphas_cumprod, ids, slots, adversarial, x0, t, noise)


def _adversarial_context(text_encoder, ids, slots, adversarial):
  """(the text encoder's output for `ids` with the word embeddings at `slots` replaced, the leaf tensor replacing
  them, the slots' mask)."""
  adv = torch.tensor(np.asarray(adversarial, np.float32), requires_grad=True)
  mask = torch.tensor(np.asarray(slots, bool))[..., None]
  layer = text_encoder.get_input_embeddings()
  handle = layer.register_forward_hook(lambda module, inputs, output: torch.where(mask, adv, output))
  try:
    return text_encoder(torch.tensor(np.asarray(ids, np.int64)))[0], adv, mask
  finally:
    handle.remove()


def _loss_and_grad(text_encoder, unet, alphas_cumprod, ids, slots, adversarial, x0, t, noise) -> dict:
  context, adv, mask = _adversarial_context(text_encoder, ids, slots, adversarial)
  t = torch.tensor(np.asarray(t, np.int64))
  a = torch.as_tensor(alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
  x0, noise = (torch.tensor(np.asarray(v, np.float32)) for v in (x0, noise))
  x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
  eps = unet(x_t, t, encoder_hidden_states=context).sample
  loss = ((eps - noise) ** 2).mean(dim=(1, 2, 3)).sum()
  loss.backward()
  return {'loss': float(loss.detach()), 'grad': (adv.grad * mask).numpy()}


class ShapesClassifier(torch.nn.Module):
  """esd_jax/shapes_world/classifier.py's ShapesClassifier, from its description: stride-2 conv blocks (conv →
  GroupNorm → SiLU) on images mapped to [-1, 1], mean- and max-pooled, a hidden layer, two heads. Loads that
  model's config and state dict (the same keys and torch layouts)."""

  def __init__(self, config: dict, state: dict):
    super().__init__()
    widths = [3, *config['block_out_channels']]
    self.convs = torch.nn.ModuleList([torch.nn.Conv2d(a, b, 3, stride=2, padding=1)
                                      for a, b in zip(widths, widths[1:])])
    self.norms = torch.nn.ModuleList([torch.nn.GroupNorm(config['norm_num_groups'], b, eps=1e-5) for b in widths[1:]])
    self.hidden = torch.nn.Linear(2 * widths[-1], config['hidden'])
    self.shape_head = torch.nn.Linear(*state['shape_head.weight'].shape[::-1])
    self.colour_head = torch.nn.Linear(*state['colour_head.weight'].shape[::-1])
    self.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in state.items()})

  def forward(self, images):  # NCHW in [0, 1]
    x = images * 2 - 1
    for conv, norm in zip(self.convs, self.norms):
      x = F.silu(norm(conv(x)))
    h = F.silu(self.hidden(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=-1)))
    return self.shape_head(h), self.colour_head(h)


def judged_loss_and_grad(text_encoder, unet, vae, scheduler, classifier, *, ids, slots, adversarial, uncond_ids,
                         latents, steps, guidance, head, label) -> dict:
  """The classifier objective: −Σ_j log p(label) that `classifier`'s head (0 shapes, 1 colours) gives the images the
  UNet draws from `latents` (J, C, h, w) in `steps` DDIM steps with classifier-free guidance, conditioned on prompts
  `ids` whose word embeddings at `slots` are `adversarial`; and its gradient with respect to those embeddings."""
  with torch.enable_grad():
    context, adv, mask = _adversarial_context(text_encoder, ids, slots, adversarial)
    uncond = text_encoder(torch.tensor(np.asarray(uncond_ids, np.int64)))[0].detach()
    both = torch.cat([uncond, context])
    scheduler.set_timesteps(steps)
    x = torch.tensor(np.asarray(latents, np.float32)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      e_uncond, e_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
      x = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, x).prev_sample
    images = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    logits = classifier(images)[head]
    loss = -F.log_softmax(logits, dim=-1)[:, label].sum()
    loss.backward()
  return {'loss': float(loss.detach()), 'grad': (adv.grad * mask).numpy()}
