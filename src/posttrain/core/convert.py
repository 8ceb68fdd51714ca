"""A YAML mapping as a tree of frozen dataclasses, driven by the fields' type hints.

Each value is converted to its field's type or reported, naming the key, the value seen and how to write it;
a value that does not fit is left unknown (None) so that the checks after the conversion skip it and a file's
every problem is reported at once. Nothing here knows the params sections: `posttrain.core.config` does.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import math
import re
import types
import typing
from enum import Enum
from typing import Any

MAX_SHOWN = 80  # characters of a value quoted in a problem
_BAD = object()  # _convert's result for a value that does not fit its type (the problem is already recorded)
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def cut(text: str) -> str:
    """`text` cut to MAX_SHOWN characters, for a problem that quotes it (a pasted text, a long list)."""
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}… ({len(text)} characters)"


def shown(value: Any) -> str:
    """`value`'s repr as a problem quotes it (`cut`)."""
    return cut(repr(value))


def _number_hint(value: Any, integer: bool) -> str:
    """How to write `value` (what YAML read for a number key) so that YAML reads a number."""
    if isinstance(value, float) and integer and math.isfinite(value) and value.is_integer():
        return f" (write {int(value)})"
    if not isinstance(value, str):
        return ""
    text = value.strip()
    if _SCIENTIFIC.fullmatch(text):  # YAML 1.1 reads 2e-3 (no dot) as a string, 2.0e-3 as a number
        number = decimal.Decimal(text)
        plain = format(number, "f")
        if integer:
            whole = number == number.to_integral_value()
            return f" (write {plain})" if whole and len(plain) <= MAX_SHOWN else ""
        mantissa, exponent = re.split("[eE]", text)
        dotted = mantissa if "." in mantissa else f"{mantissa}.0"
        plain = f"{plain} or " if len(plain) <= MAX_SHOWN else ""
        return f" (YAML 1.1 reads {cut(text)} as a string: write {plain}{dotted}e{exponent})"
    try:
        float(text)
    except ValueError:
        return ""
    return " (remove the quotes)"


def _convert(value: Any, tp: Any, key: str, problems: list[str], words: tuple[str, ...] = ()) -> Any:
    """Convert a YAML value to `tp`; when it does not fit, append a problem and return `_BAD`.

    A container's own problems make it `_BAD`; a problem inside it leaves it whole, with the bad item `_BAD`
    (a list item) or unknown (a dataclass field, see `build`). A union is its first type, None where it
    allows None, and the values of the enums after the first type (``int | BatchSize``: an integer or
    ``auto``); `words` are those values, named in the problem when the first type does not fit either.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        enums = [a for a in args[1:] if isinstance(a, type) and issubclass(a, Enum)]
        for enum in enums:
            if value in [m.value for m in enum]:
                return enum(value)
        return _convert(value, args[0], key, problems, tuple(m.value for e in enums for m in e))
    if origin is dict:
        value_type = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {shown(value)}")
            return _BAD
        out = {str(k): _convert(v, value_type, f"{key}.{cut(str(k))}", problems) for k, v in value.items()}
        return {k: _unknown(value_type) if v is _BAD else v for k, v in out.items()}
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, list):
            hint = f" (write [{cut(value)}])" if isinstance(value, str) else ""
            problems.append(f"{key}: expected a list, got {shown(value)}{hint}")
            return _BAD
        items = (_convert(v, item_type, f"{key}[{i}]", problems) for i, v in enumerate(value))
        return tuple(None if v is _BAD else v for v in items)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {shown(value)}")
            return _BAD
        return build(tp, value, key, problems)
    if isinstance(tp, type) and issubclass(tp, Enum):
        choices = [m.value for m in tp]
        if value not in choices:
            problems.append(f"{key}: {shown(value)} is not one of {choices}")
            return _BAD
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            hint = " (remove the quotes)" if str(value).lower() in ("true", "false") else ""
            problems.append(f"{key}: expected true/false, got {shown(value)}{hint}")
            return _BAD
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            what = "".join(f" or {w!r}" for w in words)
            problems.append(
                f"{key}: expected an integer{what}, got {shown(value)}{_number_hint(value, integer=True)}"
            )
            return _BAD
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(
                f"{key}: expected a number, got {shown(value)}{_number_hint(value, integer=False)}"
            )
            return _BAD
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats; they train into NaN weights
            problems.append(f"{key}: must be a finite number, got {value!r}; write a finite value")
            return _BAD
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if value is None:
                hint = " (write '' for none)"
            elif isinstance(value, (int, float, bool, datetime.date)):
                hint = " (quote it)"
            else:
                hint = ""
            problems.append(f"{key}: expected a string, got {shown(value)}{hint}")
            return _BAD
        return value
    raise TypeError(f"unsupported params type {tp} at {key}")


def _unknown(tp: Any) -> Any:
    """The stand-in for a value that did not convert: None, or a dataclass of unknowns (so checks skip it)."""
    if not dataclasses.is_dataclass(tp):
        return None
    hints = typing.get_type_hints(tp)
    return tp(**{f.name: _unknown(hints[f.name]) for f in dataclasses.fields(tp)})


def build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    """`cls` from `data`: missing keys take their defaults, values that do not convert are unknown (None)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for unknown in sorted(set(data) - set(names)):
        problems.append(
            f"{prefix}.{cut(str(unknown))}: unknown key (known: {', '.join(names)}); remove or rename it"
        )
    kwargs = {}
    for name in names:
        if name in data:
            value = _convert(data[name], hints[name], f"{prefix}.{name}", problems)
            kwargs[name] = _unknown(hints[name]) if value is _BAD else value
    return cls(**kwargs)
