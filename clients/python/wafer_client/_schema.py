"""Loads wafer's Cap'n Proto schema (``cluster.capnp``) once, on first use."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import capnp

SCHEMA_FILE = "cluster.capnp"


def schema_path() -> Path:
    """Where ``cluster.capnp`` is read from.

    ``$WAFER_SCHEMA_DIR/cluster.capnp`` if that variable is set, else the repository's
    ``capnp/cluster.capnp`` (this package lives in ``clients/python/wafer_client``).
    """
    override = os.environ.get("WAFER_SCHEMA_DIR")
    if override:
        return Path(override) / SCHEMA_FILE
    return Path(__file__).resolve().parent.parent.parent.parent / "capnp" / SCHEMA_FILE


@functools.lru_cache(maxsize=None)
def _load(path: str) -> Any:
    return capnp.load(path)


def schema() -> Any:
    """The loaded schema module (``schema().Gateway``, ``schema().Cluster``, ...)."""
    path = schema_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"wafer's Cap'n Proto schema is not at {path}; set WAFER_SCHEMA_DIR to the "
            f"folder that holds {SCHEMA_FILE}"
        )
    return _load(str(path))
