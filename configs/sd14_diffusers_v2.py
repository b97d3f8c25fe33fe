"""SD 1.4 with the 2025 code's convention and defaults (docs/method.md §2, §4): 200 iterations, lr 5e-5, bf16,
the frozen model samples x_t with PLMS. That code's η_C = 2 is the paper's η = 1 (esd-jax takes the paper's η).
512 px, not the 1024 px that code's SD 1.4 script uses by mistake."""

from configs import sd14_esd_x


def get_config():
  config = sd14_esd_x.get_config()
  config.workdir = 'outputs/sd14-diffusers-v2-van-gogh'
  config.erase.convention = 'diffusers-v2'
  config.erase.sampler = 'pndm'
  config.erase.negative_guidance = 1.0
  config.train.iterations = 200
  config.train.learning_rate = 5e-5
  config.train.compute_dtype = 'bfloat16'
  return config
