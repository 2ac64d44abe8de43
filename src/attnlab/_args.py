"""argparse value types shared by the command-line tools; each error names what was expected."""
from __future__ import annotations

import argparse
import ast
import json
import math
from typing import Any, Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def float_above(low: float, *, inclusive: bool = False, what: str = "number") -> Callable[[str], float]:
    """argparse type: a finite float > low (>= low with inclusive), else an error naming both."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            if inclusive:
                expected = f"a {what} >= {low:g}"
            else:
                expected = f"a positive {what}" if low == 0 else f"a {what} > {low:g}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def int_list(text: str) -> list[int]:
    """argparse type: '128,256' -> [128, 256], sorted, duplicates dropped, each >= 1."""
    return sorted({int_at_least(1)(part.strip()) for part in text.split(",")})


def parse_value(text: str) -> Any:
    """A JSON-ish literal: 8 -> 8, 0.5 -> 0.5, true/True -> True, null/None -> None, [1,2] -> [1, 2]; else text."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def key_value(text: str) -> tuple[str, Any]:
    """argparse type: KEY=VALUE with the value parsed by `parse_value`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value.strip())
