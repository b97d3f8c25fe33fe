"""An independent PyTorch reference for the attack's objective and its gradient (UnlearnDiffAtk, docs/method.md §9),
written from the method's description on diffusers' and transformers' own modules: the adversarial word embeddings
enter the text encoder through a forward hook on its token-embedding layer, as a leaf tensor whose gradient torch
computes. Everything in fp32."""

from __future__ import annotations

import numpy as np
import torch


def attack_loss_and_grad(text_encoder, unet, alphas_cumprod, *, ids, slots, adversarial, x0, t, noise) -> dict:
  """The summed per-image denoising loss Σ_j mean((ε(√ᾱ_t x₀ + √(1−ᾱ_t) n, t, c_j) − n)²) of prompts `ids` (J, L) whose
  word embeddings at `slots` (J, L, bool) are replaced by `adversarial` (J, L, D), and its gradient with respect to
  those embeddings (zero outside the slots). Latents x0, noise: (J, C, H, W); t: each image's timestep (J,)."""
  with torch.enable_grad():  # whatever the caller's mode (a loaded pipeline may leave gradients off)
    return _loss_and_grad(text_encoder, unet, alphas_cumprod, ids, slots, adversarial, x0, t, noise)


def _loss_and_grad(text_encoder, unet, alphas_cumprod, ids, slots, adversarial, x0, t, noise) -> dict:
  adv = torch.tensor(np.asarray(adversarial, np.float32), requires_grad=True)
  mask = torch.tensor(np.asarray(slots, bool))[..., None]
  layer = text_encoder.get_input_embeddings()
  handle = layer.register_forward_hook(lambda module, inputs, output: torch.where(mask, adv, output))
  try:
    context = text_encoder(torch.tensor(np.asarray(ids, np.int64)))[0]
  finally:
    handle.remove()
  t = torch.tensor(np.asarray(t, np.int64))
  a = torch.as_tensor(alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
  x0, noise = (torch.tensor(np.asarray(v, np.float32)) for v in (x0, noise))
  x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
  eps = unet(x_t, t, encoder_hidden_states=context).sample
  loss = ((eps - noise) ** 2).mean(dim=(1, 2, 3)).sum()
  loss.backward()
  return {'loss': float(loss.detach()), 'grad': (adv.grad * mask).numpy()}
