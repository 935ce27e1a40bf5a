"""The one default of each place cellseg keeps things.

- The model registry is a URL every worker must share (a bucket prefix in production); its
  default, a local directory, suits one machine.
- Caches and working directories are per worker: local scratch under one root, `runs/` in the
  directory a command or a flow run starts in.
"""

from __future__ import annotations

LOCAL_ROOT = "runs"
DEFAULT_REGISTRY_URL = f"{LOCAL_ROOT}/registry"
DEFAULT_CACHE_DIR = f"{LOCAL_ROOT}/cache"
DEFAULT_TRAINING_DIR = f"{LOCAL_ROOT}/training"
DEFAULT_TUNING_DIR = f"{LOCAL_ROOT}/tuning"
