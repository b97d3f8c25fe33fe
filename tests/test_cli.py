"""main.py end to end, as a user runs it."""

import os
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
  long = ' '.join(['a dog'] * 9)
  result = _main('generate', '--config.model=tiny-random', '--config.generate.steps=2', '--config.generate.seeds=(0,1)',
                 f"--config.generate.prompts=('a cat','A cat!','{long}')", f'--config.workdir={tmp_path}', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / 'generate'
  dogs = '_'.join(['a_dog'] * 9)[:60]
  # Prompts whose file names would coincide are numbered, so no image overwrites another.
  assert sorted(p.name for p in out.glob('*.png')) == sorted(
      [f'{name}_seed{s}.png' for name in ('a_cat', 'a_cat_2', dogs) for s in (0, 1)] + ['grid.png'])
  cat0, cat1 = (np.asarray(Image.open(out / f'a_cat_seed{s}.png')) for s in (0, 1))
  assert cat0.shape == (32, 32, 3) and not np.array_equal(cat0, cat1)  # seeds give different images
  assert Image.open(out / 'grid.png').size[0] > 2 * 128  # two upscaled columns plus labels
  assert (tmp_path / 'tiny-random' / 'model_index.json').is_file()
  # The 18-word prompt does not fit the 16 tokens of the tiny text encoder: said, not silently cut.
  assert "The prompt 'a dog a dog" in result.stderr and 'tokens longer than the text encoder reads' in result.stderr


def test_bad_command_and_unknown_field(tmp_path):
  result = _main('erase-everything', cwd=tmp_path)
  assert result.returncode != 0 and "Unknown command 'erase-everything'" in result.stderr
  result = _main('generate', '--config.generate.stepz=3', cwd=tmp_path)
  assert result.returncode != 0 and 'stepz' in result.stderr
  result = _main('serve', '--config.serve.port=abc', cwd=tmp_path)  # the flag parser's message, naming the flag
  assert result.returncode != 0 and "flag --config.serve.port=abc: invalid literal for int()" in result.stderr
  result = _main('serve', 'erase', cwd=tmp_path)
  assert result.returncode != 0 and '`serve` runs the web app until it is stopped (Ctrl-C): run it alone.' in (
      result.stderr)


def test_user_errors_are_one_message_before_any_work(tmp_path):
  (tmp_path / 'weights.bin').write_bytes(b'not a model')
  cases = {('erase', '--config.train.iterations=0'): '--config.train.iterations=0 is not valid',
           ('erase', "--config.export.formats=('onnx',)"): '--config.export.formats',
           ('generate', f'--config.model={tmp_path / "weights.bin"}'): 'is a file but not a single-file checkpoint',
           ('generate', '--config.attention=cudnn'): "attention='cudnn' runs on GPU only, and this backend is 'cpu'",
           ('serve', '--config.serve.port=70000'): ('--config.serve.port=70000 is not valid: expected a whole number '
                                                    '≥ 1 and ≤ 65535.'),
           ('serve', '--config.serve.host='): "--config.serve.host='' is not valid: expected a non-empty string.",
           ('serve', '--config.mesh.distributed=True'): '--config.mesh.distributed=True is not valid: expected False '
                                                        'with `serve`'}
  for args, message in cases.items():
    result = _main(*args, f'--config.workdir={tmp_path / "run"}', cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 2
  assert not (tmp_path / 'run' / 'checkpoints').exists()  # refused before any work
  shown = subprocess.run([sys.executable, str(ROOT / 'main.py'), 'erase', '--config.train.iterations=0'], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env={**os.environ, 'ESD_JAX_TRACEBACK': '1'})
  assert shown.returncode != 0 and 'Traceback' in shown.stderr


def test_dry_run_on_the_default_config(tmp_path):
  result = _main('dry_run', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'model            shapes-world' in result.stdout and 'trained tensors  ' in result.stdout


def test_dry_run_from_a_config_file_reproduces_the_spec(tmp_path):
  result = _main('dry_run', f'--config={ROOT / "configs" / "sd14_esd_u.py"}', '--config.model=sd-v1-4', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'trained tensors  598 of 686' in result.stdout
  assert 'trained params   813,495,680 of 859,520,964' in result.stdout
