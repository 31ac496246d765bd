"""The exception a refused call raises."""

from __future__ import annotations

from typing import Any


class WaferError(Exception):
    """The server refused a call: its answer's ``error.code`` was not ``ok``.

    ``code`` is the name of the schema's ``Error.Code`` enumerant, as spelled there:
    ``unauthorized``, ``forbidden``, ``notFound``, ``invalid``, ``tooLarge``,
    ``conflict``, ``unavailable``, ``failed``, ``timeout`` or ``internal``.
    ``reason`` is the REST API's finer code (e.g. ``malformed_wasm``, ``memory_limit``)
    and ``message`` is meant for people. ``log`` holds the guest's log tail when an
    invocation failed (empty otherwise).

    Transport failures (a dropped connection, a malformed message) are not
    ``WaferError`` but ``capnp.KjException`` (or ``OSError`` while connecting).
    """

    def __init__(self, code: str, reason: str = "", message: str = "", log: str = "") -> None:
        super().__init__(code, reason, message)
        self.code = code
        self.reason = reason
        self.message = message
        self.log = log

    def __str__(self) -> str:
        text = self.code
        if self.reason and self.reason != self.code:
            text += f" ({self.reason})"
        if self.message:
            text += f": {self.message}"
        return text

    def __repr__(self) -> str:
        return f"WaferError(code={self.code!r}, reason={self.reason!r}, message={self.message!r})"


def code_name(code: Any) -> str:
    """The name of a capnp ``Error.Code`` value (``unknown(N)`` for one this schema lacks)."""
    try:
        return str(code)
    except Exception:  # an enumerant newer than the loaded schema
        return f"unknown({getattr(code, 'raw', '?')})"


def check(error: Any, log: str = "") -> None:
    """Raises :class:`WaferError` unless ``error.code`` is ``ok``."""
    name = code_name(error.code)
    if name != "ok":
        raise WaferError(name, str(error.reason), str(error.message), log)
