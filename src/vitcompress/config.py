"""Config helpers shared by recipes, studies and the training config: one YAML loader, one way to
build a frozen config dataclass from a mapping, one set of value checks.

Every error is a :class:`~vitcompress.errors.VitcompressError` of one line that names the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from vitcompress.errors import VitcompressError
from vitcompress.targets import Patterns, check_patterns

# A YAML file may use anchors and aliases, but an alias stands for a whole subtree: nested
# aliases grow exponentially (a 500-byte "billion laughs" file expands to gigabytes once walked).
# Recipes and studies are small, so their expanded size is capped.
MAX_YAML_NODES = 100_000
MAX_YAML_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """Safe YAML with ``1e-4`` read as a float (YAML 1.1 wants ``1.0e-4``)."""


def _size(obj: Any, budget: int = MAX_YAML_NODES + 1) -> int:
    """Values in ``obj`` counted through nested containers, stopping past ``budget``."""
    n, stack = 0, [obj]
    while stack and n <= budget:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML text safely (no tags that build objects), ``1e-4`` as a number."""
    if len(text) > MAX_YAML_BYTES:
        raise VitcompressError(f"{source}: larger than {MAX_YAML_BYTES:,} bytes")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        first = " ".join(str(e).split()) or "parse error"
        raise VitcompressError(f"{source}: not valid YAML ({first})") from None
    except RecursionError:
        raise VitcompressError(f"{source}: nested too deeply") from None
    # PyYAML shares one object per anchor, so a bomb costs nothing until something walks it
    # (validation, substitution, JSON): refuse it here, counting values as a walk sees them.
    if _size(data) > MAX_YAML_NODES:
        raise VitcompressError(
            f"{source}: more than {MAX_YAML_NODES:,} values once aliases are expanded "
            "(an alias bomb?)"
        )
    return data


def load_yaml(path: str | Path, what: str = "file") -> Any:
    """Read and parse a YAML file; a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise VitcompressError(f"{what} not found: {path}")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise VitcompressError(f"{path}: larger than {MAX_YAML_BYTES:,} bytes")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VitcompressError(f"cannot read {what} {path}: {e}") from None
    return parse_yaml(text, str(path))


def check_keys(d: Mapping, valid: Iterable[str], where: str) -> None:
    """Raise for the first key of ``d`` not in ``valid``, listing the valid ones."""
    valid = list(valid)
    for k in d:
        if k not in valid:
            raise VitcompressError(f"{where}: unknown key {k!r}; valid keys: {', '.join(valid)}")


def build_config(cls: type, d: Any, what: str, aliases: Mapping[str, str] | None = None) -> Any:
    """A config dataclass from a mapping: unknown keys are an error naming the valid ones.

    ``layers`` is always another name for ``targets``; ``aliases`` adds more (alias -> field).
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise VitcompressError(f"{what}: expected a mapping of options, got {type(d).__name__}")
    d = dict(d)
    names = {"layers": "targets", **(aliases or {})}
    for alias, real in names.items():
        if alias in d:
            if real in d:
                raise VitcompressError(f"{what}: give {alias!r} or {real!r}, not both")
            d[real] = d.pop(alias)
    valid = [f.name for f in fields(cls) if f.init]
    unknown = [k for k in d if k not in valid]
    if unknown:
        shown = [("layers" if v == "targets" else v) for v in valid]
        raise VitcompressError(
            f"{what}: unknown key {unknown[0]!r}; valid keys: {', '.join(shown)}"
        )
    try:
        return cls(**d)
    except TypeError as e:
        raise VitcompressError(f"{what}: {e}") from None


def check_known_fields(cls: type, keys: Iterable[str], what: str) -> None:
    """Raise, naming them and the known ones, for ``keys`` not fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise VitcompressError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")


def as_patterns(value: Patterns, what: str) -> str | tuple[str, ...] | None:
    """Layer patterns normalised (a list becomes a tuple, so configs stay hashable) and checked."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = tuple(value)
    ok = value is None or isinstance(value, str) or all(isinstance(p, str) for p in value)
    if not ok:
        raise VitcompressError(f"{what}: expected a name pattern or a list of them, got {value!r}")
    check_patterns(value, what)
    return value


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(value: Any, what: str, low: int | None = None, optional: bool = False) -> None:
    """An integer (not a bool), at least ``low``; None passes when ``optional``."""
    if optional and value is None:
        return
    if not is_int(value) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise VitcompressError(f"{what} must be an integer{bound}, got {value!r}")


def check_number(
    value: Any, what: str, low: float | None = None, positive: bool = False, optional: bool = False
) -> None:
    """A finite number (not a bool), ``> 0`` when ``positive``, else at least ``low``."""
    if optional and value is None:
        return
    ok = is_number(value) and value == value and abs(value) != float("inf")
    if ok and positive:
        ok = value > 0
    elif ok and low is not None:
        ok = value >= low
    if not ok:
        bound = " > 0" if positive else f" >= {low:g}" if low is not None else ""
        raise VitcompressError(f"{what} must be a number{bound}, got {value!r}")


def check_fraction(value: Any, what: str, closed: bool = False) -> None:
    """A number in [0, 1) (or [0, 1] when ``closed``)."""
    hi_ok = (lambda v: v <= 1) if closed else (lambda v: v < 1)
    if not is_number(value) or not (0 <= value and hi_ok(value)):
        span = "[0, 1]" if closed else "[0, 1)"
        raise VitcompressError(f"{what} must be a number in {span}, got {value!r}")


def check_choice(value: Any, choices: Iterable[Any], what: str) -> None:
    choices = list(choices)
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise VitcompressError(f"{what} must be one of {shown}, got {value!r}")


__all__ = [
    "as_patterns",
    "build_config",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_keys",
    "check_known_fields",
    "check_number",
    "is_int",
    "is_number",
    "load_yaml",
    "parse_yaml",
]
