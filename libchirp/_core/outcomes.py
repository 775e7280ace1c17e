"""Completing futures, and the exceptions of the core's failure codes.

Every operation of a node completes a future on the thread handling events;
the application may have cancelled it meanwhile, which is not an error
(:func:`_set_result`, :func:`_set_exception`). Failure codes of the core are
negative (csrc/error.h) and map to the exceptions of ``libchirp.errors``.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional

from ..errors import ChirpError, ChirpShutdown, chirp_error_to_exception
from .capi import lib


def _set_result(fut: Future, value: Any) -> None:
    try:
        fut.set_result(value)
    except InvalidStateError:  # cancelled by the application
        pass


def _set_exception(fut: Future, exc: BaseException) -> None:
    try:
        fut.set_exception(exc)
    except InvalidStateError:
        pass


def _error(code: int, text: Optional[str] = None) -> ChirpError:
    """chirp_error_to_exception() for a code known to be an error (not SUCCESS)."""
    exc = chirp_error_to_exception(code, text)
    if exc is None:  # pragma: no cover - the core never reports SUCCESS as a failure
        exc = ChirpError("unexpected success code")
    return exc


#: A submission refused here, before the core (the node is stopping, or a release has
#: nothing to release). Positive, so it never equals a core code: those are negative
#: (csrc/error.h).
_REFUSED = 1


def _submit_error(rc: int) -> ChirpError:
    """The failure of a submission: a negative core code, or _REFUSED (node stopping)."""
    return _shutdown_error("node is stopping") if rc == _REFUSED else _error(rc)


def _shutdown_error(text: str = "node stopped") -> ChirpShutdown:
    exc = chirp_error_to_exception(lib.CH_SHUTDOWN, text)
    assert isinstance(exc, ChirpShutdown)
    return exc
