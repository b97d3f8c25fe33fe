"""SD 1.4 with the first diffusers port's convention and defaults (docs/method.md §2, §4): 200 iterations,
lr 2e-5, η = 2; x_t after k ∈ {1..48} DDIM steps of the model being trained, queried at 1000 − 20k."""

from configs import sd14_esd_x


def get_config():
  config = sd14_esd_x.get_config()
  config.workdir = 'outputs/sd14-diffusers-v1-van-gogh'
  config.erase.convention = 'diffusers-v1'
  config.erase.negative_guidance = 2.0
  config.train.iterations = 200
  config.train.learning_rate = 2e-5
  return config
