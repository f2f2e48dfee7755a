"""User code named on the command line as `package.module:function` (identity, label, decode, model)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from streamprune.errors import SettingsError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_function_spec(spec: str) -> bool:
    """True when `spec` has the form `package.module:function`."""
    return _SPEC.match(spec) is not None


def import_function(spec: str, what: str) -> Callable:
    """The callable `spec` names, or a ValueError naming `what` (e.g. "model") and the spec."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SettingsError(f"{what} {spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"{what} {spec!r}: cannot import: {exc}") from None
    if not callable(fn):
        raise SettingsError(f"{what} {spec!r}: {type(fn).__name__} is not callable")
    return fn
