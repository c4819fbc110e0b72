"""Scale-out: many compartments trained as parallel jobs (Ray tasks, or one after another), and compartments
trained where the data lives and imported as bundles.

- :mod:`.many`: ``cdm add-many``, the driver (checks everything, registers, stores each result; the store's only
  writer);
- :mod:`.executor`: runs jobs sequentially or as Ray tasks (retries, GPUs, one progress display);
- :mod:`.tasks`: one job, from plain data, in whatever process runs it; :mod:`.payload`: that plain data;
- :mod:`.ray_env`: Ray started with network discipline (loopback only, no cloud probes), and loopback-only network
  namespaces for tests and benchmarks;
- :mod:`.bundle`: ``cdm train-compartment`` (write a bundle) and ``cdm import`` (verify, register as imported).

Ray is optional (``pip install 'cdm[ray]'``); everything but the Ray executor works without it. docs/scale.md has
the commands, what is sent to workers and the network checks.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExecutorConfig": "cdm.scale.executor",
    "RunReport": "cdm.scale.executor",
    "run_jobs": "cdm.scale.executor",
    "ManyAdded": "cdm.scale.many",
    "add_many": "cdm.scale.many",
    "parse_named_spec": "cdm.scale.many",
    "Bundle": "cdm.scale.bundle",
    "BundleError": "cdm.scale.bundle",
    "Imported": "cdm.scale.bundle",
    "import_bundle": "cdm.scale.bundle",
    "read_bundle": "cdm.scale.bundle",
    "write_bundle": "cdm.scale.bundle",
    "ray_session": "cdm.scale.ray_env",
    "loopback_only": "cdm.scale.ray_env",
    "loopback_only_argv": "cdm.scale.ray_env",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cdm.scale' has no attribute {name!r}")
