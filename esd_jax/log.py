"""esd-jax's own log lines, apart from the libraries' (absl, orbax, jax).

`main.py` shows this logger's INFO lines by default and the libraries' only with `--verbosity` ≥ 0 (absl), so a
user sees esd-jax's progress and results without orbax's bookkeeping. Library code logs here, never prints.
"""

import logging

log = logging.getLogger('esd_jax')
