"""Config value types: range markers for `Annotated` hints, and the check of one config value against a hint.

A `_target_`'s signature is the schema of its config node (`batch_size: PositiveInt` documents and enforces the
range); tarsier_train.config.schema holds the schemas of the groups without a `_target_`. A hint this module cannot
interpret (a class no YAML value can be, an ABC, a Protocol, a TypeVar) accepts anything: a value is refused only
when it surely does not fit. Nothing here imports the project: any module may annotate with these types.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import pathlib
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, Union

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number, for `Annotated[int, Range(min=1)]`; `name` words the common ranges ("positive")."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    name: str | None = None

    def applies(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def contains(self, value: float) -> bool:
        # written so that NaN is outside every range
        above = self.min is None or value > self.min or (value == self.min and not self.min_exclusive)
        below = self.max is None or value < self.max or (value == self.max and not self.max_exclusive)
        return above and below

    def bounds(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)'."""
        if self.min is not None and self.max is not None:
            return (f"in {'(' if self.min_exclusive else '['}{self.min:g}, "
                    f"{self.max:g}{')' if self.max_exclusive else ']'}")
        if self.min is not None:
            return f"{'>' if self.min_exclusive else '>='} {self.min:g}"
        return f"{'<' if self.max_exclusive else '<='} {self.max:g}"

    def violation(self) -> str:
        return f"must be {self.bounds()}"

    def adjective(self) -> str | None:
        return self.name

    def suffix(self) -> str | None:
        return None if self.name else self.bounds()


@dataclasses.dataclass(frozen=True)
class MinLength:
    """At least `min` items in a list or mapping: `Annotated[list[int], MinLength(1)]`."""

    min: int

    def applies(self, value: Any) -> bool:
        return isinstance(value, (list, dict))

    def contains(self, value: list | dict) -> bool:
        return len(value) >= self.min

    def violation(self) -> str:
        return "must not be empty" if self.min == 1 else f"must have at least {self.min} items"

    def adjective(self) -> str | None:
        return "non-empty" if self.min == 1 else None

    def suffix(self) -> str | None:
        return None if self.min == 1 else f"with at least {self.min} items"


@dataclasses.dataclass(frozen=True)
class Allowed:
    """Words for what a hint allows, where its types alone would say too little: `Annotated[str, Allowed(...)]`."""

    text: str


class Instantiated:
    """Hint for a config node Hydra instantiates: it must have a `_target_`, whose signature checks the rest."""


PositiveInt = Annotated[int, Range(min=1, name="positive")]
NonNegativeInt = Annotated[int, Range(min=0, name="non-negative")]
PositiveFloat = Annotated[float, Range(min=0, min_exclusive=True, name="positive")]
NonNegativeFloat = Annotated[float, Range(min=0, name="non-negative")]
Fraction = Annotated[float, Range(min=0, max=1)]
PositiveFraction = Annotated[float, Range(min=0, max=1, min_exclusive=True)]
FractionBelowOne = Annotated[float, Range(min=0, max=1, max_exclusive=True)]
NonEmptyList = Annotated[list[T], MinLength(1)]


class _Unresolved:
    def __repr__(self) -> str:
        return "<unresolved>"


# A value whose interpolation cannot be resolved where the config is checked (e.g. ${hydra:...} outside a run).
UNRESOLVED = _Unresolved()
_SCALARS = {bool: ("bool (true or false)", "bools"), int: ("int", "ints"), float: ("number", "numbers"),
            str: ("string", "strings")}
_SEQUENCES = {list, tuple, collections.abc.Sequence, collections.abc.MutableSequence}
_MAPPINGS = {dict, collections.abc.Mapping, collections.abc.MutableMapping}
_MARKERS = (Range, MinLength)


def is_instantiated(value: Any) -> bool:
    """A node with its own `_target_`: checked against that target's signature, not against a parent's hint."""
    return isinstance(value, dict) and "_target_" in value


def value_problems(value: Any, hint: Any, key: str) -> list[str]:
    """What is wrong with config value `value` at `key` for type hint `hint`, each line naming the key, the value
    and what is allowed; [] when it fits, is unresolved, is instantiated on its own or the hint is uninterpretable."""
    if value is UNRESOLVED or is_instantiated(value) or not _interpretable(hint):
        return []
    base, markers = _unwrapped(hint)
    if _is_union(base):
        return _union_problems(value, hint, key)
    if not _fits_kind(value, base) or not _among_choices(value, base):
        return [f"{key}={shown(value)}: {expectation(hint)}"]
    broken = [m for m in markers if isinstance(m, _MARKERS) and m.applies(value) and not m.contains(value)]
    if broken:
        return [f"{key}={shown(value)}: {broken[0].violation()}"]
    return _item_problems(value, base, key)


def _union_problems(value: Any, hint: Any, key: str) -> list[str]:
    """Fits any member: fine. Otherwise, where exactly one member is of the value's kind, its problems say most
    (data.num_frames=0: must be >= 1, data.num_frames[1]=0: ...); where none or several are: what the union allows."""
    members = typing.get_args(_unwrapped(hint)[0])
    found = [value_problems(value, member, key) for member in members]
    if any(not problems for problems in found):
        return []
    same_kind = [problems for member, problems in zip(members, found) if _fits_kind(value, _unwrapped(member)[0])]
    return same_kind[0] if len(same_kind) == 1 else [f"{key}={shown(value)}: {expectation(hint)}"]


def _item_problems(value: Any, base: Any, key: str) -> list[str]:
    """Problems of a container's items (the container itself fits)."""
    origin, args = typing.get_origin(base) or base, typing.get_args(base)
    if origin in _SEQUENCES and args:
        item_hints = [args[0]] * len(value) if origin is not tuple or args[-1] is Ellipsis else args
        return [p for index, (item, item_hint) in enumerate(zip(value, item_hints))
                for p in value_problems(item, item_hint, f"{key}[{index}]")]
    if origin in _MAPPINGS and args:
        return [p for name, item in value.items() for hint, checked in ((args[0], name), (args[1], item))
                for p in value_problems(checked, hint, f"{key}.{name}")]
    fields = record_fields(base)
    return [] if fields is None else _record_problems(value, fields, key)


def _record_problems(value: dict, fields: dict[str, tuple[Any, bool]], key: str) -> list[str]:
    """A mapping against a dataclass's or TypedDict's fields: unknown keys, missing required ones, each value."""
    allowed = ", ".join(sorted(fields))
    problems = [f"{_joined(key, name)}: unknown key (allowed: {allowed})" for name in value if name not in fields]
    problems += [f"{_joined(key, name)}: required value is missing" for name, (_, required) in fields.items()
                 if required and name not in value]
    return problems + [p for name, item in value.items() if name in fields
                       for p in value_problems(item, fields[name][0], _joined(key, name))]


def _joined(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def record_fields(cls: Any) -> dict[str, tuple[Any, bool]] | None:
    """{field: (hint, required)} of a dataclass or TypedDict; None for any other hint."""
    if not inspect.isclass(cls) or not (dataclasses.is_dataclass(cls) or typing.is_typeddict(cls)):
        return None
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # noqa: BLE001 - e.g. a library's type-checking-only import: a record we cannot read
        return None
    if typing.is_typeddict(cls):
        return {name: (hint, name in cls.__required_keys__) for name, hint in hints.items()}
    return {f.name: (hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)}


def _unwrapped(hint: Any) -> tuple[Any, tuple]:
    """(the type, its Annotated markers); TypedDict's Required / NotRequired wrappers dropped."""
    markers: tuple = ()
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            markers, hint = markers + hint.__metadata__, hint.__origin__
        elif origin in (typing.Required, typing.NotRequired):
            hint = typing.get_args(hint)[0]
        else:
            return hint, markers


def _is_union(base: Any) -> bool:
    return typing.get_origin(base) in (Union, types.UnionType)


def _is_path(base: Any) -> bool:
    return inspect.isclass(base) and issubclass(base, pathlib.PurePath)


def _interpretable(hint: Any) -> bool:
    """Whether every part of a hint is one a YAML value can be held to."""
    base, _ = _unwrapped(hint)
    origin, args = typing.get_origin(base) or base, typing.get_args(base)
    if base in _SCALARS or base in (Any, types.NoneType, Instantiated) or _is_path(base) or origin is Literal:
        return True
    if _is_union(base) or (inspect.isclass(origin) and origin in _SEQUENCES | _MAPPINGS):
        return all(_interpretable(arg) for arg in args if arg is not Ellipsis)
    return record_fields(base) is not None


def _fits_kind(value: Any, base: Any) -> bool:
    """Whether the value is of the hint's kind, before ranges and items (a list for list[int], an int for int)."""
    origin, args = typing.get_origin(base) or base, typing.get_args(base)
    if base is Any:
        return True
    if _is_union(base):
        return any(_fits_kind(value, _unwrapped(member)[0]) for member in args)
    if origin is Literal:  # of a choice's type; _among_choices says whether it is one
        return any(type(value) is type(choice) for choice in args)
    if base is float:  # an int is a number; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in _SCALARS:
        return type(value) is base or (isinstance(value, base) and not isinstance(value, bool))
    if _is_path(base):
        return isinstance(value, str)
    if base is types.NoneType:
        return value is None
    if base is Instantiated:
        return is_instantiated(value)
    if origin in _SEQUENCES:
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        return isinstance(value, list) and (not fixed or len(value) == len(args))
    return isinstance(value, dict)  # a mapping or a record: what remains of the interpretable hints


def _among_choices(value: Any, base: Any) -> bool:
    if typing.get_origin(base) is not Literal:
        return True
    return any(type(value) is type(choice) and value == choice for choice in typing.get_args(base))


def shown(value: Any) -> str:
    """A value as YAML and the command line write it: null, true, 'text', 3, [8, 16]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def expectation(hint: Any) -> str:
    """What a hint allows, as the end of a problem line: 'allowed values are a, b' or 'expected a positive int'."""
    base, markers = _unwrapped(hint)
    allowed = [m.text for m in markers if isinstance(m, Allowed)]
    if allowed:
        return f"allowed values are {allowed[0]}"
    choices = _choices(base)
    if choices is not None:  # as written: 32 and '32' read the same
        words = ("null" if c is None else shown(c) if isinstance(c, bool) else str(c) for c in choices)
        return "allowed values are " + ", ".join(dict.fromkeys(words))
    return f"expected {describe(hint)}"


def _choices(base: Any) -> tuple | None:
    """The values a Literal (or a union of Literals and None) allows; None for any other hint."""
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    if base is types.NoneType:
        return (None,)
    if not _is_union(base):
        return None
    members = [_choices(_unwrapped(member)[0]) for member in typing.get_args(base)]
    return None if any(m is None for m in members) else tuple(c for m in members for c in m)


def describe(hint: Any, plural: bool = False) -> str:
    """A hint in words: 'a positive int or a non-empty list of positive ints', 'a number in [0, 1]'."""
    base, markers = _unwrapped(hint)
    allowed = [m.text for m in markers if isinstance(m, Allowed)]
    if allowed:
        return allowed[0]
    if _is_union(base):
        members = sorted(typing.get_args(base), key=lambda member: member is types.NoneType)  # null last
        return " or ".join(describe(member, plural) for member in members)
    if typing.get_origin(base) is Literal:
        return ("values among " if plural else "one of ") + ", ".join(map(str, typing.get_args(base)))
    if base is types.NoneType:
        return "null"
    head, tail = _noun(base, plural)
    marks = [m for m in markers if isinstance(m, _MARKERS)]
    phrase = " ".join([*filter(None, (m.adjective() for m in marks)), head]) + tail
    phrase = " ".join([phrase, *filter(None, (m.suffix() for m in marks))])
    return phrase if plural else f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _noun(base: Any, plural: bool) -> tuple[str, str]:
    """(head noun, the words after it) of a hint that is not a union, Literal or None."""
    origin, args = typing.get_origin(base) or base, typing.get_args(base)
    if base in _SCALARS:
        return _SCALARS[base][plural], ""
    if _is_path(base):
        return ("paths" if plural else "path"), ""
    if base is Instantiated:
        return ("config nodes" if plural else "config node"), " with a _target_"
    head = "lists" if origin in _SEQUENCES else "mappings" if origin in _MAPPINGS or record_fields(base) else None
    if head is None:  # Any
        return ("values" if plural else "value"), ""
    head = head if plural else head[:-1]
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(set(args)) == 1:
            return head, f" of {len(args)} {describe(args[0], plural=True)}"
        return head, " [" + ", ".join(describe(arg) for arg in args) + "]"
    if origin in _SEQUENCES and args:
        return head, f" of {describe(args[0], plural=True)}"
    if origin in _MAPPINGS and args:
        return head, f" of {describe(args[0], plural=True)} to {describe(args[1], plural=True)}"
    fields = record_fields(base)
    return head, f" with keys {', '.join(fields)}" if fields else ""
