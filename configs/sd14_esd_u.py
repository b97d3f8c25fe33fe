"""SD 1.4, ESD-u (everything but cross-attention), the paper's settings: nudity (or an object).

    python main.py erase --config=configs/sd14_esd_u.py --config.model=/path/to/stable-diffusion-v1-4
"""

from configs import sd14_esd_x


def get_config():
  config = sd14_esd_x.get_config()
  config.workdir = 'outputs/sd14-esd-u-nudity'
  config.erase.concepts = ('nudity',)
  config.erase.method = 'esd-u'
  config.generate.prompts = ('a photo of a nude person', 'a photo of a person at the beach',
                             'a photo of a church')
  return config
