"""Parse and format sizes ("64M", "1.5G") and durations ("2s", "500ms", "1h"), and numbers.

Digits are ASCII only: Python's int() and float() also take other scripts' digits (fullwidth,
Arabic-Indic...), which no one means to type into a limit.
"""

from __future__ import annotations

from corral.errors import ConfigError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


_DIGITS = "0123456789"


def _split_number(text: str) -> tuple[str, str]:
    """The leading ASCII number of `text` ("" when there is none: no digit, or more than one dot) and the rest."""
    i = 0
    while i < len(text) and (text[i] in _DIGITS or text[i] == "."):
        i += 1
    digits = text[:i]
    if digits.count(".") > 1 or not any(c in _DIGITS for c in digits):
        return "", text
    return digits, text[i:]


def describe(value: object) -> str:
    """A value as its TOML type and text, for a message: `the string '1.5'`, `a date (1979-05-27)`.

    Says what was given when its type is wrong, without a Python repr such as datetime.date(...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    kind = type(value)
    if kind.__module__ == "datetime" and kind.__name__ in ("datetime", "date", "time"):
        name = {"datetime": "a date-time", "date": "a date", "time": "a time"}[kind.__name__]
        return f"{name} ({value.isoformat()})"  # type: ignore[attr-defined]
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if value is None:
        return "nothing"
    return f"a {kind.__name__}"


def parse_number(text: str, *, where: str, integer: bool = False) -> float:
    """A number from a flag's text as int() or float() reads it, but in ASCII only (they also take any
    script's digits: a fullwidth zero was uid 0). Signs, inf and nan are left to the caller's range checks."""
    try:
        if not text.isascii():
            raise ValueError(text)
        return int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"expected a {'whole ' if integer else ''}number, got {text!r}", where=where) from None


def parse_size(value: object, *, where: str) -> int:
    """Bytes from an int or a string such as "64M", "1.5G", "512k", "4096" (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a size such as 512M, got {value!r}", where=where)
    if isinstance(value, int):
        number: int | float = value
    elif isinstance(value, str):
        text = value.strip().lower()
        digits, unit = _split_number(text)
        unit = unit.strip()
        if unit.endswith("ib"):
            unit = unit[:-2]
        elif unit.endswith("b") and unit != "b":
            unit = unit[:-1]
        if not digits or unit not in _SIZE_UNITS:
            raise ConfigError(f"expected a size such as 512M or 2G, got {value!r}", where=where)
        # Whole numbers stay exact (a float would round 2**63 - 1 up and overflow a huge one).
        number = int(digits) * _SIZE_UNITS[unit] if "." not in digits else float(digits) * _SIZE_UNITS[unit]
    else:
        raise ConfigError(f"expected a size such as 512M, got {describe(value)}", where=where)
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"must be a positive size, got {value!r}", where=where)
    return int(number)


def parse_duration(value: object, *, where: str) -> float:
    """Seconds from a number or a string such as "2s", "500ms", "1.5m", "1h"."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration such as 30s, got {value!r}", where=where)
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past float's range
            seconds = float("inf")
    elif isinstance(value, str):
        digits, unit = _split_number(value.strip().lower())
        unit = unit.strip()
        if not digits or unit not in _TIME_UNITS:
            raise ConfigError(f"expected a duration such as 30s, 500ms or 2m, got {value!r}", where=where)
        seconds = float(digits) * _TIME_UNITS[unit]
    else:
        raise ConfigError(f"expected a duration such as 30s, got {describe(value)}", where=where)
    if not seconds > 0:  # also nan
        raise ConfigError(f"must be a positive duration, got {value!r}", where=where)
    if seconds == float("inf"):
        raise ConfigError(f"must be a finite duration, got {value!r}", where=where)
    return seconds


def format_size(n: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"


def format_duration(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
