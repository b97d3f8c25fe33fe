"""The web app (`python main.py serve`): erase, test and download erased models in a browser, on the JAX engine.

A layer above esd_jax.commands, which it runs as the command line does; nothing in esd_jax imports it (main.py
starts it). One concern per module:

- server.py: `serve(config)`: builds the page, listens on serve.host:serve.port, stops cleanly on Ctrl-C;
- ui.py: the page (gradio): the Erase, Test and Models tabs and what each control does;
- forms.py: form values → a validated config (the CLI's checks and messages), the train methods explained;
- trainer.py: the server's one training at a time, in a thread of its own: progress, stop, resume;
- studio.py: the Test tab's generation (original and erased models in one jitted batch) and the classifier's verdicts;
- workspace.py: what the app keeps under config.workdir: runs, their settings, losses and reports, imported
  weights, exported downloads.
"""
