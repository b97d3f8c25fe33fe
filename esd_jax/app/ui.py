"""The page: the Erase, Test and Models tabs, and what each control does.

Every handler returns {component: new value} and goes through `_shown`, which turns an error into one line in its
tab's message box: a user error (esd_jax.errors.USER_ERRORS: a bad field, a missing or corrupt file, a run that
cannot resume) as its message, the command line's own; anything else as one line naming it, its traceback in the
server log. The server goes on either way. The progress box is redrawn from the Trainer twice a second on every
open page, so each visitor sees the one training the server runs.
"""

from __future__ import annotations

import functools
import html
import shutil
from pathlib import Path

import gradio as gr
import ml_collections
import pandas as pd

from esd_jax.app import forms, workspace
from esd_jax.app.studio import Studio
from esd_jax.app.trainer import Busy, Progress, Trainer, unexpected
from esd_jax.errors import USER_ERRORS, RunError, user_message
from esd_jax.log import log

EXPORT_DTYPES = ('fp32', 'fp16', 'bf16')
FORMAT_CHOICES = [('trained: only the trained tensors (.safetensors, diffusers keys)', 'trained'),
                  ('single_file: one CompVis checkpoint for A1111 / ComfyUI (.safetensors)', 'single_file'),
                  ('diffusers: the whole pipeline folder (.zip)', 'diffusers'),
                  ('unet: the UNet folder (.zip)', 'unet')]
STATE_LABELS = {'starting': 'starting', 'training': 'training', 'finishing': 'writing the model', 'finished':
                'finished', 'stopped': 'stopped', 'failed': 'failed'}
CSS = """
.esd-progress progress { width: 100%; height: 1.1em; }
.esd-progress .esd-numbers { font-variant-numeric: tabular-nums; }
.esd-error { color: #b3261e; font-weight: 600; white-space: pre-wrap; }
.esd-note { white-space: pre-wrap; }
"""


def _error(text: str) -> str:
  return f'<div class="esd-error">{html.escape(text)}</div>'


def _note(text: str) -> str:
  return f'<div class="esd-note">{html.escape(text)}</div>' if text else ''


def _shown(message: gr.components.Component):
  """Wraps a handler so that its errors appear in `message` (one line) and the page stays as it was."""
  def wrap(handler):
    @functools.wraps(handler)
    def run(*args):
      try:
        return handler(*args)
      except Busy as e:
        return {message: _note(str(e))}
      except USER_ERRORS as e:
        return {message: _error(user_message(e))}
      except Exception as e:
        log.exception('The page\'s %s failed', handler.__name__)
        return {message: _error(unexpected(e))}
    return run
  return wrap


def _pressed(button: gr.Button, message: gr.components.Component):
  """button's click, which first empties `message`: what it said about the last press must not stand for this one."""
  return button.click(lambda: '', None, message, queue=False, show_progress='hidden')


def progress_html(p: Progress) -> str:
  if p.state == 'idle':
    return ('<div class="esd-progress" data-state="idle">No training on this server yet: fill in the form and '
            'press Start.</div>')
  numbers = [f'iteration {p.step} / {p.total}']
  if p.loss is not None:
    numbers.append(f'loss {p.loss:.5f}')
  if p.rate:
    numbers.append(f'{p.rate:.2f} it/s')
  if p.first_step:
    numbers.append(f'resumed at {p.first_step}')
  state = STATE_LABELS[p.state] + (' (stopping)' if p.stopping else '')
  message = (_error if p.state == 'failed' else _note)(p.message)
  return (f'<div class="esd-progress" data-state="{p.state}" data-step="{p.step}" data-total="{p.total}">'
          f'<div><b>{html.escape(p.what)}</b> · run {html.escape(p.run)} · <span class="esd-state">{state}</span>'
          f'</div><progress value="{p.step}" max="{max(p.total, 1)}"></progress>'
          f'<div class="esd-numbers">{" · ".join(numbers)}</div>{message}</div>')


def _loss_frame(folder: Path) -> pd.DataFrame:
  return pd.DataFrame(workspace.losses(folder), columns=['step', 'loss', 'model'])


def build(base: ml_collections.ConfigDict, root: Path) -> tuple[gr.Blocks, Trainer]:
  """The page of a server whose runs live under `root`, with `base` (model resolved) for the forms' defaults."""
  trainer, studio = Trainer(), Studio(base)
  model_names = lambda: [m.name for m in workspace.erased_models(root)]

  def start_run(config: ml_collections.ConfigDict, folder: Path, *, new: bool):
    try:
      trainer.start(config, folder)
    except Busy:
      if new:
        shutil.rmtree(folder, ignore_errors=True)
      raise
    return {erase_message: '', progress: progress_html(trainer.progress())}

  def resume_run(name: str | None):
    """Resumes run `name`, or else the run this server stopped last, or else the newest resumable one."""
    if not name:
      last = trainer.progress().run
      names = [n for n in dict.fromkeys(([last] if last else []) + workspace.run_names(root))
               if workspace.run_state(root, n).resumable]
      if not names:
        raise FileNotFoundError(f'No stopped run with a checkpoint to resume in {root / workspace.RUNS}.')
      name = names[0]
    state = workspace.run_state(root, name)
    if state.finished:
      raise RunError(f'Run {name} is finished ({state.total} iterations): there is nothing to resume.')
    return start_run(workspace.run_config(state.folder), state.folder, new=False)

  # Gradio keeps a copy of every image and download it serves: files older than an hour go, checked half-hourly.
  with gr.Blocks(title='esd-jax: erase concepts from diffusion models', analytics_enabled=False,
                 delete_cache=(1800, 3600)) as page:
    gr.Markdown(f'## esd-jax: erase a concept from `{base.model}`\n'
                '**Erase** trains (one training at a time on this server; Stop keeps a checkpoint, Resume goes on '
                'from it), **Test** shows the original beside the erased models, **Models** lists the runs with '
                f'their loss and report, exports them and imports the authors\' weights. Everything is kept in '
                f'`{root}`.')
    with gr.Tabs():
      # ---------------------------------------------------------------------------------------------------- Erase
      with gr.Tab('Erase', id='erase'):
        with gr.Row():
          with gr.Column(scale=3):
            concepts = gr.Textbox('\n'.join(_as_list(base.erase.concepts)), lines=2, label='Concept(s) to erase',
                                  info='one a line; each iteration draws one', elem_id='concepts')
            erase_from = gr.Textbox(base.erase.erase_from if isinstance(base.erase.erase_from, str) else '',
                                    label='Erase from prompt (optional)', elem_id='erase-from',
                                    info='erase the concept only from this prompt, e.g. "red" from "a red circle"')
            method = gr.Dropdown(forms.method_choices(), value=base.erase.method, allow_custom_value=True,
                                 label='Method: which weights train', elem_id='method')
            with gr.Row():
              eta = gr.Number(base.erase.negative_guidance, label='η (negative guidance)', elem_id='eta')
              iterations = gr.Number(base.train.iterations, precision=0, label='Iterations', elem_id='iterations')
              learning_rate = gr.Number(base.train.learning_rate, label='Learning rate', elem_id='learning-rate')
            convention = gr.Radio(['paper', 'diffusers-v1', 'diffusers-v2'], value=base.erase.convention,
                                  label='Convention: how x_t is sampled (paper: the CompVis code, the paper\'s '
                                        'numbers)', elem_id='convention')
            with gr.Accordion('More settings', open=False):
              separate = gr.Checkbox(base.erase.separate_models, label='One erased model per concept (trained '
                                     'together in one batched step)')
              with gr.Row():
                seed = gr.Number(base.train.seed, precision=0, label='Seed')
                checkpoint_every = gr.Number(base.train.checkpoint_every, precision=0,
                                             label='Checkpoint every (iterations)')
              formats = gr.CheckboxGroup(['trained', 'diffusers', 'unet', 'single_file'],
                                         value=list(base.export.formats), label='Formats written at the end '
                                         '(trained is always written: the app finds models by it)')
              export_dtype = gr.Radio(list(EXPORT_DTYPES), value=base.export.dtype, label='Their dtype')
              with gr.Row():
                measure = gr.Checkbox(bool(base.evaluate.classifier), label='Measure original vs erased with '
                                      'the shapes-world classifier (shapes world only)')
                measure_seeds = gr.Number(base.evaluate.seeds, precision=0, label='Images per prompt measured')
            with gr.Row():
              start = gr.Button('Start', variant='primary', elem_id='start')
              stop = gr.Button('Stop', elem_id='stop')
              resume = gr.Button('Resume', elem_id='resume')
          with gr.Column(scale=2):
            progress = gr.HTML(progress_html(trainer.progress()), elem_id='erase-progress')
            erase_message = gr.HTML(elem_id='erase-message')
      # ----------------------------------------------------------------------------------------------------- Test
      with gr.Tab('Test', id='test') as test_tab:
        with gr.Row():
          with gr.Column(scale=2):
            prompts = gr.Textbox('\n'.join(_as_list(base.generate.prompts)[:1]), lines=2, label='Prompt(s)',
                                 info='one a line', elem_id='prompts')
            with gr.Row():
              seeds = gr.Textbox(', '.join(map(str, base.generate.seeds)), label='Seeds', elem_id='seeds')
              guidance = gr.Number(base.generate.guidance_scale, label='Guidance', elem_id='guidance')
              steps = gr.Number(base.generate.steps, precision=0, label='Steps (DDIM)', elem_id='steps')
          with gr.Column(scale=2):
            chosen = gr.CheckboxGroup(label='Erased models, each shown beside the original', elem_id='test-models')
            with gr.Row():
              refresh_models = gr.Button('Refresh the list', size='sm')
              generate = gr.Button('Generate', variant='primary', elem_id='generate')
        test_message = gr.HTML(elem_id='test-message')
        gallery = gr.Gallery(label='Original and erased: same seed, same noise', columns=2, format='png',
                             object_fit='contain', elem_id='gallery')
        report = gr.Dataframe(headers=workspace.REPORT_HEADERS, label='Erasure report of the runs (shapes world: '
                              'how often the classifier sees each concept)', interactive=False, elem_id='test-report')
        grid = gr.File(label='The compare grid (PNG)', elem_id='grid', interactive=False, height=90)
      # --------------------------------------------------------------------------------------------------- Models
      with gr.Tab('Models', id='models') as models_tab:
        with gr.Row():
          run = gr.Dropdown(label='Run', elem_id='runs', scale=4)
          resume_selected = gr.Button('Resume this run', scale=1, elem_id='resume-selected')
        run_status = gr.HTML(elem_id='run-status')
        with gr.Row():
          run_settings = gr.Dataframe(headers=['setting', 'value'], label='Settings', interactive=False, scale=2)
          loss_plot = gr.LinePlot(x='step', y='loss', color='model', title='Loss', scale=3, elem_id='loss-plot')
        run_report = gr.Dataframe(headers=workspace.REPORT_HEADERS, label='Erasure report', interactive=False)
        gr.Markdown('### Download an erased model')
        with gr.Row():
          download_model = gr.Dropdown(label='Erased model', elem_id='download-model', scale=2)
          fmt = gr.Radio(FORMAT_CHOICES, value='trained', label='Format', elem_id='format', scale=3)
          dtype = gr.Radio(list(EXPORT_DTYPES), value='fp32', label='dtype', elem_id='dtype', scale=1)
        export = gr.Button('Export for download', elem_id='export')
        models_message = gr.HTML(elem_id='models-message')
        download = gr.File(label='Download', elem_id='download', interactive=False, height=90)
        gr.Markdown('### Import the authors\' ESD weights\nThe released `.pt` files, the 2025 code\'s '
                    '`.safetensors`, the demo\'s `.pt`: read as `export` reads them (pickles with tensors only, '
                    'never their code), checked against this model.')
        with gr.Row():
          upload = gr.File(label='ESD weights file', file_types=['.pt', '.safetensors', '.ckpt', '.pth'],
                           elem_id='upload', scale=3, height=140)
          import_name = gr.Textbox(label='Name (default: the file\'s)', elem_id='import-name', scale=2)
        import_button = gr.Button('Import', elem_id='import')
        import_message = gr.HTML(elem_id='import-message')

    timer = gr.Timer(0.5)

    # ------------------------------------------------------------------------------------------------ Erase events
    erase_form = {'concepts': concepts, 'erase_from': erase_from, 'method': method, 'negative_guidance': eta,
                  'iterations': iterations, 'learning_rate': learning_rate, 'convention': convention,
                  'separate_models': separate, 'seed': seed, 'checkpoint_every': checkpoint_every, 'formats': formats,
                  'export_dtype': export_dtype, 'measure': measure, 'measure_seeds': measure_seeds}

    @_shown(erase_message)
    def on_start(*values):
      fields = dict(zip(erase_form, values))  # forms.erase_config's keywords
      folder = root / workspace.RUNS / 'new'  # the checks need a workdir; the run's own is made once they pass
      config = forms.erase_config(base, folder, **fields)
      if trainer.progress().running:
        trainer.start(config, folder)  # raises Busy: what runs, said in the page
      folder = workspace.new_run(root, tuple(config.erase.concepts), config.erase.method)
      config.workdir = str(folder)
      workspace.save_run_config(folder, config)
      return start_run(config, folder, new=True)

    _pressed(start, erase_message).then(on_start, list(erase_form.values()), [erase_message, progress])

    @_shown(erase_message)
    def on_stop():
      p = trainer.stop()
      return {erase_message: '' if p.running else _note('No training is running.'), progress: progress_html(p)}
    stop.click(on_stop, None, [erase_message, progress], concurrency_limit=None)

    _pressed(resume, erase_message).then(_shown(erase_message)(lambda: resume_run(None)), None,
                                         [erase_message, progress])
    show_progress = lambda: progress_html(trainer.progress())
    timer.tick(show_progress, None, progress, show_progress='hidden', concurrency_limit=None)
    page.load(show_progress, None, progress, show_progress='hidden', concurrency_limit=None)

    # ------------------------------------------------------------------------------------------------- Test events
    def model_choices(current):
      names = model_names()
      kept = [n for n in (current or []) if n in names]
      return gr.CheckboxGroup(choices=names, value=kept or names[:1])

    listed = _shown(test_message)(lambda current: {chosen: model_choices(current)})
    test_tab.select(listed, chosen, [chosen, test_message])
    refresh_models.click(listed, chosen, [chosen, test_message])

    @_shown(test_message)
    def on_generate(prompt_text, seed_text, guidance_scale, step_count, names):
      settings = forms.compare_settings(base, prompts=prompt_text, seeds=seed_text, guidance_scale=guidance_scale,
                                        steps=step_count)
      models = [workspace.find_model(root, name) for name in names or []]
      path = root / 'compare' / 'grid.png'
      images = studio.compare(settings, models, path)
      # A row per prompt (for each seed the models side by side, as in the compare grid) where that fits.
      per_prompt = (len(models) + 1) * len(settings.seeds)
      columns = per_prompt if per_prompt <= 8 else len(models) + 1
      return {gallery: gr.Gallery(value=images, columns=columns), report: workspace.report_rows(models),
              grid: str(path), test_message: ''}
    _pressed(generate, test_message).then(on_generate, [prompts, seeds, guidance, steps, chosen],
                                          [gallery, report, grid, test_message])

    # ----------------------------------------------------------------------------------------------- Models events
    def show_run(name):
      if not name:
        return {run_status: _note('No run yet.'), run_settings: [], loss_plot: _loss_frame(root / 'none'),
                run_report: []}
      state = workspace.run_state(root, name)
      models = [m for m in workspace.erased_models(root) if m.name.split('/')[0] == name]
      return {run_status: _note(state.describe()), run_settings: workspace.settings(state.config),
              loss_plot: _loss_frame(state.folder), run_report: workspace.report_rows(models)}

    def refresh_lists(current_run, current_model):
      runs, names = workspace.run_names(root), model_names()
      current_run = current_run if current_run in runs else (runs[0] if runs else None)
      return {run: gr.Dropdown(choices=runs, value=current_run),
              download_model: gr.Dropdown(choices=names, value=current_model if current_model in names else
                                          (names[0] if names else None)),
              **show_run(current_run)}
    run_outputs = [run_status, run_settings, loss_plot, run_report, models_message]
    models_tab.select(_shown(models_message)(refresh_lists), [run, download_model],
                      [run, download_model, *run_outputs])
    run.change(_shown(models_message)(show_run), run, run_outputs)
    resumed = lambda name: {**resume_run(name), models_message: _note(f'Resumed {name}: the Erase tab shows its '
                                                                      'progress.')}
    _pressed(resume_selected, models_message).then(_shown(models_message)(resumed), run,
                                                   [erase_message, progress, models_message])

    @_shown(models_message)
    def on_export(name, fmt_value, dtype_value):
      if not name:
        raise FileNotFoundError('No erased model yet: finish a run in the Erase tab, or import weights below.')
      path = workspace.export_download(root, base, workspace.find_model(root, name), fmt_value, dtype_value)
      return {download: str(path), models_message: _note(f'Exported {name} as {fmt_value} ({dtype_value}): '
                                                         f'{path.name}')}
    _pressed(export, models_message).then(on_export, [download_model, fmt, dtype], [download, models_message])

    @_shown(import_message)
    def on_import(path, name):
      if not path:
        raise FileNotFoundError('Choose an ESD weights file to import first.')
      model = workspace.import_weights(root, path, name, studio.check_weights)
      names = model_names()
      return {download_model: gr.Dropdown(choices=names, value=model.name),
              import_message: _note(f'Imported {model.name}: it is in the Test tab\'s list and here.')}
    _pressed(import_button, import_message).then(on_import, [upload, import_name],
                                                 [download_model, import_message])
  return page, trainer


def _as_list(value) -> list:
  return [value] if isinstance(value, str) else list(value)
