"""Prefect flows for cellseg: orchestration only; every task calls one cellseg library function."""

import logging

# The library sets no level on its `cellseg.*` loggers. In flow-run and Dask worker processes no CLI
# sets one either, so its INFO lines ("loaded model ...") would fall below the root logger's
# WARNING; at INFO they reach the process's log, and the run's logs in the UI with
# PREFECT_LOGGING_EXTRA_LOGGERS=cellseg. A level set by whoever runs the flows (`cellseg -q`) stays.
if logging.getLogger("cellseg").level == logging.NOTSET:
    logging.getLogger("cellseg").setLevel(logging.INFO)
