"""Shared plumbing for parity tests against the PyTorch reference (diffusers/transformers on torch)."""

from __future__ import annotations

import numpy as np
import torch
from flax import nnx

from esd_jax.models.state_dict import load_state_dict, param_shapes

torch.set_grad_enabled(False)


def numpy_state(torch_module: torch.nn.Module) -> dict[str, np.ndarray]:
  """The torch module's parameters (named_parameters: shared tensors once) as float32 numpy arrays."""
  return {k: v.detach().float().numpy() for k, v in torch_module.named_parameters()}


def torch_twin(config: dict) -> torch.nn.Module:
  """The diffusers/transformers model of one of our UNet, VAE or CLIP text-encoder configs, with torch's
  random initialisation (seed it with torch.manual_seed)."""
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel

  kwargs = {k: v for k, v in config.items() if not k.startswith('_') and k != 'architectures'}
  if '_class_name' not in config:  # a text encoder; our tokenizers number <start> just before <end>
    return CLIPTextModel(CLIPTextConfig(**kwargs, bos_token_id=config['eos_token_id'] - 1))
  return {'AutoencoderKL': AutoencoderKL, 'UNet2DConditionModel': UNet2DConditionModel}[config['_class_name']](**kwargs)


def load_from_torch(module: nnx.Module, torch_module: torch.nn.Module) -> nnx.Module:
  """Copies a torch module's weights into ours; key sets must match exactly."""
  return load_state_dict(module, numpy_state(torch_module), source=type(torch_module).__name__)


def assert_same_names(module: nnx.Module, torch_module: torch.nn.Module):
  ours = param_shapes(module)
  ref = {k: tuple(v.shape) for k, v in torch_module.named_parameters()}
  assert ours == ref


def nchw(x) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
  x = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
  return np.transpose(x, (0, 2, 3, 1))


def rel_err(ours, ref) -> float:
  ours = np.asarray(ours, np.float64)
  ref = ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def randomize(torch_module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
  """Overwrites every parameter with random values: diffusers zero-initialises some output layers,
  which would hide errors in everything before them."""
  g = torch.Generator().manual_seed(seed)
  for _, p in sorted(torch_module.named_parameters()):
    p.copy_(torch.randn(p.shape, generator=g) * scale)
  return torch_module
