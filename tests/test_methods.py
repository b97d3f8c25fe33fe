"""Train methods: the spec's table (docs/method.md §3) from configs alone, and bad selections."""

import pytest

from esd_jax.loading import unet_config
from esd_jax.methods import summary, trained_keys
from esd_jax.models import build_abstract
from esd_jax.models.state_dict import param_shapes

SD14_TABLE = {  # method: (tensors, parameters), docs/method.md §3
    'esd-x': (80, 43_962_560), 'esd-u': (598, 813_495_680), 'esd-x-strict': (32, 19_169_280),
    'esd-self': (80, 49_574_080), 'esd-all': (686, 859_520_964), 'notime': (678, 857_458_240),
    'xlayer': (10, 3_605_760), 'selflayer': (10, 8_193_920),
    'xattn': (80, 43_962_560), 'noxattn': (598, 813_495_680), 'selfattn': (80, 49_574_080), 'full': (686, 859_520_964),
}


@pytest.fixture(scope='module')
def sd14():
  return param_shapes(build_abstract(unet_config('sd-v1-4')))


@pytest.mark.parametrize('method', sorted(SD14_TABLE))
def test_sd14_table(sd14, method):
  info = summary(sd14, method)
  assert (info['tensors'], info['parameters']) == SD14_TABLE[method]
  assert info['optimizer_state_bytes'] == 8 * info['parameters']


def test_other_unets_cross_attention():
  for model, want in [('sd-v2-1', (80, 50_352_320)), ('sdxl-base-1.0', (350, 545_670_400))]:
    info = summary(param_shapes(build_abstract(unet_config(model))), 'esd-x')
    assert (info['tensors'], info['parameters']) == want


def test_patterns(sd14):
  keys = trained_keys(sd14, 'patterns', [r'attn2\.to_k', r'^conv_in\.'])
  assert len(keys) == 16 + 2 and 'conv_in.weight' in keys


def test_bad_selections(sd14):
  with pytest.raises(ValueError, match=r"Unknown train method 'esd-z'. Valid methods: \['esd-all', 'esd-self'"):
    trained_keys(sd14, 'esd-z')
  with pytest.raises(ValueError, match=r"patterns \['attn9'\] selects no UNet parameter"):
    trained_keys(sd14, 'patterns', ['attn9'])
  with pytest.raises(ValueError, match='needs a non-empty list'):
    trained_keys(sd14, 'patterns', [])
