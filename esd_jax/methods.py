"""Which UNet weights each ESD train method trains (docs/method.md §3), as rules on diffusers parameter names."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

_OUTER = ('time_embedding.', 'conv_norm_out.', 'conv_out.')  # what ESD-u and notime leave frozen

METHODS: dict[str, Callable[[str], bool]] = {
    # Cross-attention: prompt-specific erasure (the paper's choice for artistic styles).
    'esd-x': lambda k: 'attn2' in k,
    # Everything but cross-attention and the time/output layers: global erasure (nudity, objects).
    'esd-u': lambda k: 'attn2' not in k and not k.startswith(_OUTER),
    'esd-x-strict': lambda k: 'attn2.to_k' in k or 'attn2.to_v' in k,
    'esd-self': lambda k: 'attn1' in k,
    'esd-all': lambda k: True,
    'notime': lambda k: not k.startswith(_OUTER),
    'xlayer': lambda k: 'attn2' in k and k.startswith(('up_blocks.2.attentions.0.', 'up_blocks.2.attentions.2.')),
    'selflayer': lambda k: 'attn1' in k and k.startswith(('down_blocks.1.attentions.0.', 'down_blocks.2.attentions.0.')),
}

# The CompVis code's names for the same methods.
ALIASES = {'xattn': 'esd-x', 'noxattn': 'esd-u', 'selfattn': 'esd-self', 'full': 'esd-all'}


def method_names() -> list[str]:
  return sorted(METHODS) + sorted(ALIASES)


def selector(method: str, patterns: Sequence[str] = ()) -> Callable[[str], bool]:
  """The rule for `method`, or, with method 'patterns', a key matches if any regex in `patterns` finds it."""
  if method == 'patterns':
    if not patterns:
      raise ValueError("train method 'patterns' needs a non-empty list of regular expressions (train.patterns).")
    compiled = [re.compile(p) for p in patterns]
    return lambda k: any(c.search(k) for c in compiled)
  name = ALIASES.get(method, method)
  if name not in METHODS:
    raise ValueError(f'Unknown train method {method!r}. Valid methods: {method_names() + ["patterns"]}.')
  return METHODS[name]


def trained_keys(keys: Iterable[str], method: str, patterns: Sequence[str] = ()) -> list[str]:
  """The sorted parameter keys `method` trains; an error if it selects none."""
  keys = list(keys)
  chosen = sorted(k for k in keys if selector(method, patterns)(k))
  if not chosen:
    what = f'patterns {list(patterns)}' if method == 'patterns' else f'method {method!r}'
    raise ValueError(f'Train {what} selects no UNet parameter (of {len(keys)}, e.g. {keys[:3]}).')
  return chosen


def summary(shapes: Mapping[str, tuple[int, ...]], method: str, patterns: Sequence[str] = (),
            dtype_bytes: int = 4) -> dict[str, int]:
  """Tensors and parameters trained, and the bytes of their Adam state (two moments of the trained subset)."""
  keys = trained_keys(shapes, method, patterns)
  params = sum(int(np.prod(shapes[k])) for k in keys)
  return {'tensors': len(keys), 'parameters': params, 'total_tensors': len(shapes),
          'total_parameters': sum(int(np.prod(s)) for s in shapes.values()),
          'optimizer_state_bytes': 2 * params * dtype_bytes}
