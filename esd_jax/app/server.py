"""`python main.py serve`: the web app on serve.host:serve.port until Ctrl-C.

Offline: gradio's analytics and version check are off, nothing is shared (no share link), the page loads no
fonts or scripts from elsewhere. There is no authentication (configs/default.py, README "Web app"): the default
address is the loopback one. Ctrl-C stops a training in progress after its iteration, with its checkpoint, before
the server exits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ml_collections

from esd_jax.loading import model_path
from esd_jax.workdir import ensure_writable

# Read when gradio is imported and when a page is built: no analytics, no version check, no Hub telemetry.
os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'
os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'


def serve(config: ml_collections.ConfigDict) -> None:
  import gradio as gr

  from esd_jax.app import ui

  root = Path(config.workdir)
  ensure_writable(root)
  base = ml_collections.ConfigDict(config.to_dict())
  if base.model == 'tiny-random':  # built once under the server's workdir, not again in every run's
    base.model = str(model_path(base.model, root))
  page, trainer = ui.build(base, root)
  page.queue(default_concurrency_limit=1)
  host, port = config.serve.host, config.serve.port
  page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
              ssr_mode=False, pwa=False, mcp_server=False, show_error=False, inbrowser=False,
              max_file_size=config.serve.max_upload_mb * 1024 * 1024,
              allowed_paths=[str(root / 'downloads'), str(root / 'compare')], css=ui.CSS,
              theme=gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                                      font_mono=['ui-monospace', 'monospace']))
  print(f'esd-jax web app on {config.model}: http://{host}:{port}/ (runs in {root / "runs"}; Ctrl-C stops it)',
        flush=True)
  try:
    while True:
      time.sleep(0.5)
  except KeyboardInterrupt:
    if trainer.progress().running:
      print('Stopping the training after its iteration (its checkpoint is kept; Resume continues it)…', flush=True)
      trainer.stop()
      trainer.join()
      print(trainer.progress().message, flush=True)
  finally:
    page.close()
