"""SD 1.4, ESD-x (cross-attention), the paper's settings: an artistic style.

    python main.py erase --config=configs/sd14_esd_x.py --config.model=/path/to/stable-diffusion-v1-4
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'CompVis/stable-diffusion-v1-4'  # a Hub id (needs the Hub) or a local folder / single file
  config.workdir = 'outputs/sd14-esd-x-van-gogh'
  config.erase.concepts = ('Van Gogh',)
  config.erase.method = 'esd-x'
  config.erase.convention = 'paper'
  config.erase.negative_guidance = 1.0
  config.train.iterations = 1000
  config.train.learning_rate = 1e-5
  config.export.formats = ('trained',)
  config.evaluate.classifier = ''  # the shapes-world classifier measures the shapes world only
  config.generate.prompts = ('The Starry Night by Van Gogh', 'a painting of a wheat field by Van Gogh',
                             'a painting of a lake by Claude Monet')
  return config
