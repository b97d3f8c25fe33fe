"""The web app (`python main.py serve`) in a real browser: headless Debian Chromium driven by Playwright, on the
small random pipeline of esd_jax.tiny, as a user goes through it: erase to the end, compare in the Test tab,
download and import weights, bad input, stop midway and resume, a second visitor while a run goes on.

One server and one browser for the whole story (one test), so that a run of the suite starts the server once
whatever the workers. The unit tests below it check the forms and the workspace without a browser.
"""

import json
import re
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from convert.esd_weights import read_esd_weights
from esd_jax.app import forms, workspace
from esd_jax.validate import ConfigError
from tests import browser

MAX_SCREENSHOT_BYTES = 150_000


def _runs(workdir: Path) -> list[Path]:
  return sorted((workdir / 'runs').glob('*')) if (workdir / 'runs').is_dir() else []


def _erase_to_the_end(page, workdir: Path) -> Path:
  browser.fill(page, concepts='cat', iterations=5)
  page.click('#start')
  done = browser.wait_progress(page, 'finished')
  assert done['step'] == done['total'] == 5, done
  assert re.search(r'iteration 5 / 5 · loss \d+\.\d+ · \d+\.\d+ it/s', done['text']), done['text']
  [run] = _runs(workdir)
  assert run.name.endswith('-cat-esd-x')
  assert [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4, 5]
  assert (run / 'erased' / 'unet_trained.safetensors').is_file()
  return run


def _test_tab_shows_original_and_erased(page, run: Path) -> None:
  browser.tab(page, 'Test')
  page.wait_for_selector(f'#test-models :text("{run.name}")')
  captions = browser.generate(page)
  assert page.locator('#gallery img').count() == 2
  assert captions == ['original · seed 0', f'{run.name} · seed 0'], captions
  grid = run.parent.parent / 'compare' / 'grid.png'
  assert grid.is_file() and page.locator('#grid a[download]').count() == 1


def _download_the_trained_file(page, run: Path, downloads: Path) -> Path:
  browser.tab(page, 'Models')
  page.wait_for_selector('#run-status :text("finished: 5 iterations")')
  path = browser.export(page, None, 'trained', 'fp32', downloads)
  assert path.name == f'{run.name.replace("-", "_")}-trained-fp32.safetensors'
  downloaded = read_esd_weights(path)  # the project's reader, as `export` and `compare` use it
  written = read_esd_weights(run / 'erased' / 'unet_trained.safetensors')
  assert sorted(downloaded) == sorted(written) and len(downloaded) == 20  # esd-x on the small UNet
  assert all('attn2' in k for k in downloaded)
  assert all(np.array_equal(downloaded[k](), written[k]()) for k in downloaded)
  return path


class _Settings:
  """Something besides tensors in a pickle: loading it would run this module's code."""


def _import_the_authors_format(page, trained: Path, tmp_path: Path) -> None:
  """The demo line's nested-dict .pt (torch.save of {'unet.<module>': {'weight': …}}) imports; a pickle with more
  than tensors is refused with the reader's message."""
  import torch

  from convert.esd_weights import write_demo_pt

  demo = tmp_path / 'cat-ESDx.pt'
  write_demo_pt(demo, read_esd_weights(trained))
  page.locator('#upload input[type=file]').set_input_files(str(demo))
  page.click('#import')
  assert 'Imported imported/cat_esdx' in browser.message(page, 'import-message', 'note')
  evil = tmp_path / 'evil.pt'
  torch.save({'conv_in.weight': torch.zeros(2), 'args': _Settings()}, evil)
  page.locator('#upload button[aria-label="Clear"]').click()
  page.locator('#upload input[type=file]').set_input_files(str(evil))
  page.click('#import')
  refused = browser.message(page, 'import-message')
  assert 'holds pickled Python objects besides tensors' in refused and 'Traceback' not in refused, refused


def _bad_input_is_a_message_in_the_page(page, workdir: Path) -> None:
  before = _runs(workdir)
  browser.tab(page, 'Erase')
  browser.fill(page, method='esd-z')
  page.click('#start')
  text = browser.message(page, 'erase-message')
  assert text.startswith("--config.erase.method='esd-z' is not valid: expected one of ['esd-all'"), text
  assert _runs(workdir) == before  # refused before any run was made
  page.click('#resume')  # nothing stopped to resume: said so
  assert 'No stopped run with a checkpoint to resume' in browser.message(page, 'erase-message')
  browser.fill(page, method='esd-x', iterations=0)
  page.click('#start')
  page.wait_for_selector('#erase-message :text("--config.train.iterations=0 is not valid")')
  # A run that fails once started (xlayer's layers are not in the small UNet) is reported; the server goes on.
  browser.fill(page, method='xlayer', iterations=5)
  page.click('#start')
  failed = browser.wait_progress(page, 'failed')
  assert "Train method 'xlayer' selects no UNet parameter" in failed['text'], failed
  browser.tab(page, 'Test')
  browser.fill(page, seeds='0, x')
  page.click('#generate')
  assert "--config.generate.seeds=(0, 'x') is not valid" in browser.message(page, 'test-message')
  assert 'Traceback' not in page.content()


def _stop_midway_and_resume(context, url: str, workdir: Path) -> None:
  page = browser.open_page(context, url)
  browser.fill(page, concepts='dog', iterations=100)
  page.click('#start')
  browser.wait_step(page, 2)
  page.click('#stop')
  stopped = browser.wait_progress(page, 'stopped')
  step = stopped['step']
  assert 2 <= step < 100, stopped
  assert f'Stopped after iteration {step} of 100; checkpoint step {step} is kept' in stopped['text']
  run = _runs(workdir)[-1]
  assert run.name.endswith('-dog-esd-x') and (run / 'checkpoints' / str(step)).is_dir()
  assert not (run / 'erased').exists()
  page.click('#resume')
  # A second visitor sees the running training, and Start tells them it runs rather than failing.
  other = browser.open_page(context, url)
  browser.wait_progress(other, 'starting', 'training', timeout=20_000)
  other.click('#start')
  assert 'A training is running on this server' in browser.message(other, 'erase-message', 'note')
  other.close()
  done = browser.wait_progress(page, 'finished')
  assert done['step'] == 100 and f'resumed at {step}' in done['text'], done
  steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert steps == list(range(1, 101))
  assert (run / 'erased' / 'unet_trained.safetensors').is_file()


def test_the_app_in_a_browser(model, tmp_path):
  missing = browser.environment_ready()
  assert missing is None, missing
  workdir, downloads, shots = tmp_path / browser.WORKDIR, tmp_path / 'downloads', tmp_path / 'screenshots'
  downloads.mkdir()
  settings = [f'--config.model={model}', '--config.evaluate.classifier=', '--config.erase.method=esd-x',
              '--config.erase.ddim_steps=4', "--config.export.formats=('trained',)", "--config.generate.prompts=('a cat',)",
              '--config.generate.seeds=(0,)', '--config.generate.steps=4']
  with browser.server(tmp_path, *settings) as url, browser.chromium(downloads) as context:
    elsewhere = []  # the app is offline: every request of its pages goes to the server itself
    context.on('request', lambda r: None if r.url.startswith((url, 'data:', 'blob:')) else elsewhere.append(r.url))
    page = browser.open_page(context, url)
    run = _erase_to_the_end(page, workdir)
    browser.screenshot(page, shots / 'erase.png')
    _test_tab_shows_original_and_erased(page, run)
    browser.screenshot(page, shots / 'test.png')
    trained = _download_the_trained_file(page, run, downloads)
    browser.screenshot(page, shots / 'models.png')
    _import_the_authors_format(page, trained, tmp_path)
    _bad_input_is_a_message_in_the_page(page, workdir)
    _stop_midway_and_resume(context, url, workdir)
  assert not elsewhere, elsewhere
  for name in ('erase', 'test', 'models'):
    assert 0 < (shots / f'{name}.png').stat().st_size <= MAX_SCREENSHOT_BYTES


# --------------------------------------------------------------------------------------------------------------
# Without a browser.


def _form(**changes):
  fields = dict(concepts='circle\n\n square ', erase_from='', method='esd-x', negative_guidance=2.0, iterations=10,
                learning_rate=1e-4, convention='paper', separate_models=False, seed=0, checkpoint_every=5,
                formats=['diffusers'], export_dtype='fp16', measure=False, measure_seeds=4)
  return {**fields, **changes}


def test_the_erase_form_is_the_config_erase_checks(tmp_path):
  config = forms.erase_config(get_config(), tmp_path, **_form())
  assert config.erase.concepts == ('circle', 'square') and config.erase.method == 'esd-x'
  assert config.export.formats == ('diffusers', 'trained')  # the app finds a run's models by the trained file
  assert config.evaluate.classifier == '' and config.workdir == str(tmp_path)
  cases = {'method': ('esd-z', "--config.erase.method='esd-z' is not valid: expected one of"),
           'iterations': (None, '--config.train.iterations=None is not valid: expected a whole number ≥ 1'),
           'learning_rate': (0.0, '--config.train.learning_rate=0.0 is not valid: expected a finite number > 0'),
           'concepts': (' \n', "--config.erase.concepts=() is not valid"),
           'convention': ('diffusers-v3', "--config.erase.convention='diffusers-v3' is not valid")}
  for field, (value, message) in cases.items():
    with pytest.raises(ConfigError) as raised:
      forms.erase_config(get_config(), tmp_path, **_form(**{field: value}))
    assert str(raised.value).startswith(message), str(raised.value)


def test_the_test_form_parses_seeds_and_leaves_bad_ones_to_the_validator():
  assert forms.whole_numbers('0, 1 2') == (0, 1, 2)
  settings = forms.compare_settings(get_config(), prompts='a red circle\n', seeds='3', guidance_scale=5.0, steps=10)
  assert (tuple(settings.prompts), tuple(settings.seeds), settings.steps) == (('a red circle',), (3,), 10)
  with pytest.raises(ConfigError, match=re.escape("--config.generate.seeds=(1, '2.5') is not valid")):
    forms.compare_settings(get_config(), prompts='a', seeds='1, 2.5', guidance_scale=5.0, steps=10)
  with pytest.raises(ConfigError, match=re.escape('--config.generate.steps=0 is not valid')):
    forms.compare_settings(get_config(), prompts='a', seeds='1', guidance_scale=5.0, steps=0)


def test_every_method_of_the_command_line_is_offered_and_explained():
  from esd_jax.methods import method_names
  offered = {value: label for label, value in forms.method_choices()}
  assert set(offered) == set(method_names()) | {'patterns'}
  assert all(len(label) > len(value) + 10 for value, label in offered.items())


def test_the_workspace_reads_runs_and_reports(tmp_path):
  config = ml_collections.ConfigDict(get_config().to_dict())
  run = workspace.new_run(tmp_path, ('a red circle',), 'esd-u')
  config.workdir = str(run)
  workspace.save_run_config(run, config)
  (run / 'metrics.jsonl').write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
  (run / 'checkpoints' / '2').mkdir(parents=True)
  (run / 'checkpoints' / '3.orbax-checkpoint-tmp-1').mkdir()  # being written: not a checkpoint yet
  state = workspace.run_state(tmp_path, run.name)
  assert (state.done, state.checkpoint, state.finished, state.resumable) == (2, 2, False, True)
  assert state.describe() == 'stopped at iteration 2 of 200: Resume continues it'
  assert workspace.losses(run) == [{'step': 1, 'loss': 0.5, 'model': '0'}, {'step': 2, 'loss': 0.25, 'model': '0'}]
  assert ['method', 'esd-u'] in workspace.settings(state.config)
  assert workspace.erased_models(tmp_path) == []  # not finished: nothing to test yet
  (run / 'erased').mkdir()
  (run / 'erased' / workspace.TRAINED).write_bytes(b'')
  summary = {'concept': 'circle', 'kind': 'shape', 'base_rate': 1.0, 'erased_rate': 0.05, 'others': {
      'square': {'before': 1.0, 'after': 0.92, 'drop': 0.08}, 'cross': {'before': 1.0, 'after': 1.0, 'drop': 0.0}}}
  (run / 'report.json').write_text(json.dumps({'models': {'erased': {'summary': [summary]}}}))
  [erased] = workspace.erased_models(tmp_path)
  assert erased.name == run.name and erased.concepts == ('circle',)
  assert workspace.report_rows([erased]) == [[run.name, 'circle', '100%', '5%', 'square −8 points',
                                              'square 100%→92%, cross 100%→100%']]
  assert workspace.run_state(tmp_path, run.name).describe() == 'finished: 200 iterations'


def test_a_stop_event_ends_a_run_like_ctrl_c_and_the_same_config_resumes(model, tmp_path):
  """train.run_erasure's hooks for the app, from a thread of its own as the app runs it: `on_iteration` sees every
  metrics record with the total; `stop` ends the run after the iteration in progress with its checkpoint."""
  import threading

  from esd_jax.errors import RunError
  from esd_jax.train import run_erasure

  config = get_config()
  config.model, config.workdir = str(model), str(tmp_path)
  config.erase.method, config.erase.ddim_steps, config.train.iterations = 'esd-x', 4, 6
  stop, seen, outcome = threading.Event(), [], []

  def on_iteration(record):
    seen.append((record['step'], record['total'], record['loss']))
    if record['step'] == 2:
      stop.set()

  def run():
    try:
      outcome.append(run_erasure(config, progress=False, stop=stop, on_iteration=on_iteration))
    except RunError as e:
      outcome.append(e)
  thread = threading.Thread(target=run)
  thread.start()
  thread.join(timeout=600)
  [stopped] = outcome
  assert isinstance(stopped, RunError) and stopped.exit_code == 130, stopped
  assert str(stopped).startswith('Interrupted: stopped after iteration 2 of 6 and saved checkpoint step 2')
  assert [(step, total) for step, total, _ in seen] == [(1, 6), (2, 6)] and all(np.isfinite(l) for *_, l in seen)
  assert (tmp_path / 'checkpoints' / '2').is_dir()
  result = run_erasure(config, progress=False, on_iteration=on_iteration)  # resumes at 3
  assert [step for step, _, _ in seen[2:]] == [3, 4, 5, 6] and result.metadata['iterations'] == 6


def test_the_app_sits_above_the_commands():
  """Arrows point down: the app uses the commands and the library; only main.py starts it."""
  from tests.test_imports import GRAPH
  app = {m for m in GRAPH if m == 'esd_jax.app' or m.startswith('esd_jax.app.')}
  assert {'esd_jax.app.server', 'esd_jax.app.ui', 'esd_jax.app.trainer'} <= app
  assert {m for m, imported in GRAPH.items() if imported & app and m not in app} == {'main'}
  assert 'esd_jax.commands' in GRAPH['esd_jax.app.trainer']
