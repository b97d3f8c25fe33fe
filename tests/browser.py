"""Driving the web app in a real browser: `python main.py serve` on a free port, headless Debian Chromium through
Playwright, and the page steps a user takes. tests/test_app.py and tests/app_screenshots.py (the README's
pictures) share them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'  # Debian's package (.ci/run installs it); Playwright's own builds are not fetched
# No sandbox (root in a container), no GPU, and none of Chromium's own traffic (updates, sync, QUIC probes): the
# machines' network refuses it, and the app must not need it.
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']
LONG = 300_000  # ms: compiling a step on 2 busy cores


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


WORKDIR = 'outputs/app'  # the server's workdir, relative to the folder it runs in (as a user would start it)


@contextlib.contextmanager
def server(folder: Path, *overrides: str, timeout: float = 180) -> Iterator[str]:
  """`python main.py serve` run in `folder` with `overrides` (--config.FIELD=VALUE) on a free port, its workdir
  folder / WORKDIR; yields its URL. Its output goes to folder/server.log, shown when it fails to come up."""
  port = free_port()
  folder.mkdir(parents=True, exist_ok=True)
  log = open(folder / 'server.log', 'w')
  proc = subprocess.Popen([sys.executable, str(ROOT / 'main.py'), 'serve', f'--config.workdir={WORKDIR}',
                           f'--config.serve.port={port}', *overrides], cwd=folder, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
  url = f'http://127.0.0.1:{port}/'
  try:
    deadline = time.time() + timeout
    while True:
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f'The server did not come up:\n{(folder / "server.log").read_text()[-4000:]}')
      try:
        with urllib.request.urlopen(url, timeout=5) as response:
          if response.status == 200:
            break
      except OSError:
        time.sleep(0.5)
    yield url
  finally:
    proc.terminate()  # SIGTERM: the server goes like a killed process (a run's checkpoints are complete or absent)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


@contextlib.contextmanager
def chromium(downloads: Path | None = None) -> Iterator:
  """A headless Chromium with a fresh profile; yields its Playwright browser context."""
  from playwright.sync_api import sync_playwright

  with tempfile.TemporaryDirectory(prefix='esd-jax-chromium-') as profile, sync_playwright() as playwright:
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, accept_downloads=True,
        downloads_path=str(downloads) if downloads else None, viewport={'width': 1200, 'height': 900})
    try:
      yield context
    finally:
      context.close()


def open_page(context, url: str):
  page = context.new_page()
  page.goto(url)
  page.wait_for_selector('#start', timeout=60_000)
  return page


def tab(page, name: str) -> None:
  page.get_by_role('tab', name=name).click()


def field(page, elem_id: str):
  """The text box of the component with this elem_id (gradio draws a text box as a textarea, a number as an input)."""
  return page.locator(f'#{elem_id} textarea, #{elem_id} input').first


def fill(page, **fields) -> None:
  """Types into the form fields named by elem_id (with _ for -); `method` is typed too, as a custom value may be."""
  for name, value in fields.items():
    box = field(page, name.replace('_', '-'))
    box.click()
    box.fill(str(value))
    if name == 'method':
      box.press('Enter')
      field(page, 'concepts' if page.locator('#concepts').is_visible() else 'prompts').click()  # commits it


def progress(page) -> dict:
  """The progress box's state, step and total (as the page shows them)."""
  box = page.locator('#erase-progress .esd-progress')
  return {'state': box.get_attribute('data-state'), 'step': int(box.get_attribute('data-step') or 0),
          'total': int(box.get_attribute('data-total') or 0), 'text': box.inner_text()}


def wait_progress(page, *states: str, timeout: int = LONG) -> dict:
  """The progress once it is in one of `states` (idle, starting, training, finishing, finished, stopped, failed)."""
  page.wait_for_selector(', '.join(f'#erase-progress .esd-progress[data-state="{s}"]' for s in states),
                         timeout=timeout)
  return progress(page)


def wait_step(page, step: int, timeout: int = LONG) -> dict:
  page.wait_for_function(
      f'() => Number(document.querySelector("#erase-progress .esd-progress")?.dataset.step || 0) >= {step}',
      timeout=timeout)
  return progress(page)


def message(page, box: str, kind: str = 'error', timeout: int = 60_000) -> str:
  """The text of a tab's message box (erase-message, test-message, models-message, import-message) once it shows
  a message of this kind: 'error' or 'note'."""
  page.wait_for_selector(f'#{box} .esd-{kind}', timeout=timeout)
  return page.inner_text(f'#{box} .esd-{kind}')


def generate(page, timeout: int = LONG) -> list[str]:
  """Presses Generate on the Test tab; the captions of the images that come back."""
  page.click('#generate')
  page.wait_for_selector('#gallery img', timeout=timeout)
  page.wait_for_timeout(500)  # the thumbnails' captions render after the images
  return page.locator('#gallery .caption-label').all_inner_texts()


def export(page, model: str | None, fmt: str, dtype: str, downloads: Path, timeout: int = LONG) -> Path:
  """Exports an erased model on the Models tab and downloads it through the page's link; the file's path."""
  if model:
    page.locator('#download-model input').fill(model)
    page.locator('#download-model input').press('Enter')
  page.locator('#format').get_by_label(fmt, exact=False).first.check()
  page.locator('#dtype').get_by_label(dtype, exact=True).check()
  page.click('#export')
  link = page.locator('#download a[download]').first
  link.wait_for(timeout=timeout)
  with page.expect_download(timeout=60_000) as download:
    link.click()
  path = downloads / download.value.suggested_filename
  download.value.save_as(path)
  return path


def screenshot(page, path: Path, *, colours: int = 128) -> Path:
  """The whole page as a small PNG (an adaptive palette: the README's pictures stay well under 150 kB)."""
  from PIL import Image

  path.parent.mkdir(parents=True, exist_ok=True)
  page.screenshot(path=str(path), full_page=True)
  image = Image.open(path).convert('RGB')
  image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
  return path


def environment_ready() -> str | None:
  """Why the browser tests cannot run here (no Chromium, no Playwright), or None."""
  if not os.path.exists(CHROMIUM):
    return f'{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)'
  if importlib.util.find_spec('playwright') is None:
    return 'playwright is missing: pip install -r requirements-test.txt'
  return None
