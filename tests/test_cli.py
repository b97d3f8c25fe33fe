"""main.py end to end, as a user runs it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _main(*args, cwd):
  return subprocess.run([sys.executable, str(ROOT / 'main.py'), *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600)


def test_generate_writes_images_and_grid(tmp_path):
  result = _main('generate', '--config.model=tiny-random', '--config.generate.steps=2', '--config.generate.seeds=(0,1)',
                 "--config.generate.prompts=('a cat','a dog')", f'--config.workdir={tmp_path}', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / 'generate'
  assert sorted(p.name for p in out.glob('*.png')) == ['a_cat_seed0.png', 'a_cat_seed1.png', 'a_dog_seed0.png',
                                                      'a_dog_seed1.png', 'grid.png']
  cat0, cat1 = (np.asarray(Image.open(out / f'a_cat_seed{s}.png')) for s in (0, 1))
  assert cat0.shape == (32, 32, 3) and not np.array_equal(cat0, cat1)  # seeds give different images
  assert Image.open(out / 'grid.png').size[0] > 2 * 128  # two upscaled columns plus labels
  assert (tmp_path / 'tiny-random' / 'model_index.json').is_file()


def test_bad_command_and_unknown_field(tmp_path):
  result = _main('erase-everything', cwd=tmp_path)
  assert result.returncode != 0 and "Unknown command 'erase-everything'" in result.stderr
  result = _main('generate', '--config.generate.stepz=3', cwd=tmp_path)
  assert result.returncode != 0 and 'stepz' in result.stderr


def test_dry_run_from_a_config_file_reproduces_the_spec(tmp_path):
  result = _main('dry_run', f'--config={ROOT / "configs" / "sd14_esd_u.py"}', '--config.model=sd-v1-4', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'trained tensors  598 of 686' in result.stdout
  assert 'trained params   813,495,680 of 859,520,964' in result.stdout
