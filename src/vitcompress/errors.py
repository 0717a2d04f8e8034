"""One error type for everything a user can fix; the CLI prints it as one line."""

from collections.abc import Iterable
from dataclasses import fields


class VitcompressError(Exception):
    """A problem with the user's input (file, recipe, shape, option), stated in one line."""


def check_known_fields(cls: type, keys: Iterable[str], what: str) -> None:
    """Raise, naming them and the known ones, for ``keys`` not fields of dataclass ``cls``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise VitcompressError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")
