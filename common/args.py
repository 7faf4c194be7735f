"""One argument layer for the command lines and the Python API.

A value is described once, by an `Arg` (Int, Real, Text, Flag): its type and range. The same object is the
argparse `type=` of a flag (a bad value is argparse's one line and exit 2, naming the flag) and the check of an
API parameter (`validated`: a bad value is UserError naming the parameter). Every bound is finite: a count of
10**12 samples or steps is refused at once instead of running for ever. tests/test_hostile_generic.py reads every
flag of every command and every parameter of every public API function and tries wrong types and out-of-range
values on each, so a new flag or parameter without a check here fails the suite.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
from pathlib import Path

from medgen.common.errors import UserError, os_error_text

BIG = 10**7          # the largest count any job takes (samples, steps, images); 15,000 is a large synthetic set


class Arg:
    """A value's type and range; check() returns it converted or raises UserError naming `name`."""
    optional = False

    def check(self, value, name: str):
        if value is None and self.optional:
            return None
        return self.convert(value, name)

    def convert(self, value, name: str):
        raise NotImplementedError

    def parse(self, text: str):
        """A flag's text as the value an API caller would pass (numbers parsed; API strings are never numbers)."""
        return text

    def __call__(self, text: str):               # argparse type=: the message argparse prints after the flag
        try:
            return self.convert(self.parse(text), "")
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err).lstrip(": ")) from None

    def describe(self) -> str:
        return type(self).__name__


def _parse_number(text: str, kind):
    try:
        return kind(text) if kind is int else float(text)
    except ValueError:
        raise UserError(f": expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def _number_text(value, name: str, kind):
    """A number (bools, strings and other objects refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise UserError(f"{name}: expected {'an integer' if kind is int else 'a number'}, got "
                        f"{type(value).__name__} {value!r}")
    if kind is int and not hasattr(value, "__index__"):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise UserError(f"{name}: expected an integer, got {value!r}")
    return int(value) if kind is int else float(value)


class Number(Arg):
    """A bounded finite number; Int and Real differ only in the kind they accept."""
    kind: type = float
    noun = "a number"

    def __init__(self, low=0, high=BIG, optional: bool = False, what: str = "", low_open: bool = False):
        self.low, self.high, self.optional, self.what, self.low_open = low, high, optional, what, low_open

    def parse(self, text: str):
        return _parse_number(text, self.kind)

    def convert(self, value, name: str):
        number = _number_text(value, name, self.kind)
        below = number <= self.low if self.low_open else number < self.low
        if not math.isfinite(number) or below or number > self.high:
            raise UserError(f"{name}: must be {self.describe()}{' (' + self.what + ')' if self.what else ''}, "
                            f"got {_shown(number)}")
        return number

    def describe(self) -> str:
        return f"{self.noun} in {'(' if self.low_open else '['}{_shown(self.low)}, {_shown(self.high)}]"


def _shown(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


class Int(Number):
    kind, noun = int, "an integer"


class Real(Number):
    def __init__(self, low: float = 0.0, high: float = 1e6, optional: bool = False, low_open: bool = False,
                 what: str = ""):
        super().__init__(low, high, optional, what, low_open)


class Text(Arg):
    """A string (a path, a name); choices: the allowed values."""

    def __init__(self, choices: tuple[str, ...] | None = None, optional: bool = False, path: bool = False):
        self.choices, self.optional, self.path = choices, optional, path

    def convert(self, value, name: str):
        if self.path and isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value or "\0" in value:
            raise UserError(f"{name}: expected {'a path' if self.path else 'text'}, got "
                            f"{type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{name}: {value!r} is not one of {', '.join(self.choices)}")
        return value


class Flag(Arg):
    def convert(self, value, name: str):
        if not isinstance(value, bool):
            raise UserError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
        return value


SEED = Int(0, 2**63 - 1, what="a non-negative 63-bit seed")
STEPS = Int(1, 100_000, optional=True, what="sampling steps")


def validated(checked_inside: tuple[str, ...] = (), **specs: Arg):
    """Check the named parameters of an API function with their Arg before it runs (UserError naming the
    parameter); an OSError inside (a read-only folder, a file where a folder must be) is UserError too, as the
    command lines print it. `checked_inside`: parameters whose value the function itself checks (a tensor, a
    model, a folder), each with its own UserError. The generic hostile test reads both (`__arg_specs__`,
    `__checked_inside__`) and requires every parameter to be in one of them."""
    def wrap(fn):
        signature = inspect.signature(fn)
        unknown = (set(specs) | set(checked_inside)) - set(signature.parameters)
        if unknown:
            raise TypeError(f"validated({', '.join(sorted(unknown))}): not parameters of {fn.__qualname__}")

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as err:
                raise UserError(f"{fn.__qualname__}(): {err}") from None
            for name, spec in specs.items():
                if name in bound.arguments:
                    bound.arguments[name] = spec.check(bound.arguments[name], f"{name}=")
            try:
                return fn(*bound.args, **bound.kwargs)
            except OSError as err:
                raise UserError(os_error_text(err)) from None
        call.__arg_specs__ = specs
        call.__checked_inside__ = tuple(checked_inside)
        return call
    return wrap
