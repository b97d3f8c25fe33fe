"""The README's pictures of the web app (docs/screenshots/*.png), taken the way tests/test_app.py drives it, on the
shipped shapes-world model so that they show real shapes:

    python tests/app_screenshots.py [--out docs/screenshots]   # about 4 minutes on 2 cores

It erases "circle" with the default recipe (ESD-u, η 3, 200 iterations; 4 images per prompt measured), compares
"a red circle" and "a green square" with the original, and opens the run in the Models tab.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import browser  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=Path, default=browser.ROOT / 'docs' / 'screenshots')
  out = parser.parse_args().out
  with tempfile.TemporaryDirectory(prefix='esd-jax-screenshots-') as tmp:
    with browser.server(Path(tmp), '--config.evaluate.seeds=4') as url, browser.chromium(Path(tmp)) as context:
      page = browser.open_page(context, url)
      page.click('#start')
      browser.wait_progress(page, 'finished')
      print(browser.screenshot(page, out / 'erase.png'))
      browser.tab(page, 'Test')
      page.wait_for_selector('#test-models input:checked')
      browser.fill(page, prompts='a red circle\na green square', seeds='0, 1')
      browser.generate(page)
      print(browser.screenshot(page, out / 'test.png'))
      browser.tab(page, 'Models')
      page.wait_for_selector('#run-status :text("finished")')
      page.wait_for_timeout(1500)  # the loss plot draws after its data
      print(browser.screenshot(page, out / 'models.png'))


if __name__ == '__main__':
  main()
