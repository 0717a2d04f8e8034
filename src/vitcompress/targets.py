"""One name matcher used by every operator: which modules of a tree a step touches.

A pattern is either a glob over fully-qualified module names (``blocks.*.mlp.fc1``,
``*attn.qkv``) or a regular expression prefixed with ``re:`` (``re:blocks\\.[0-5]\\..*``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from vitcompress.errors import VitcompressError

Patterns = str | Sequence[str] | None


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def name_matches(name: str, pattern: str) -> bool:
    """True when a fully-qualified module name matches a glob or a ``re:`` pattern."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_patterns(patterns: Patterns, what: str = "layers") -> None:
    """Raise a one-line error for a ``re:`` pattern that does not compile."""
    for p in _as_list(patterns):
        if not isinstance(p, str):
            raise VitcompressError(f"{what}: pattern {p!r} is not a string")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise VitcompressError(f"{what}: bad regular expression {p!r}: {e}") from None


def select_modules(
    model: nn.Module,
    targets: Patterns = "*",
    ignore: Patterns = None,
    types: tuple[type[nn.Module], ...] = (nn.Linear,),
    what: str = "layers",
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` whose names match any of ``targets`` and none of ``ignore``.

    Raises:
        VitcompressError: when a target pattern matches no module of the wanted types, so that a
            typo in a recipe fails before any work instead of silently doing nothing.
    """
    tlist = _as_list(targets) or ["*"]
    ilist = _as_list(ignore)
    check_patterns(tlist, what)
    check_patterns(ilist, what)
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    chosen: list[tuple[str, nn.Module]] = []
    for pattern in tlist:
        hits = [(n, m) for n, m in candidates if name_matches(n, pattern)]
        if not hits:
            kinds = "/".join(t.__name__ for t in types)
            example = ", ".join(n for n, _ in candidates[:3])
            raise VitcompressError(
                f"{what}: pattern {pattern!r} matches no {kinds} module "
                f"(names look like: {example})"
            )
    for n, m in candidates:
        if any(name_matches(n, p) for p in tlist) and not any(name_matches(n, p) for p in ilist):
            chosen.append((n, m))
    return chosen


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which the child hangs."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``, in the old one's train/eval mode."""
    parent, attr = get_submodule_parent(model, name)
    old = getattr(parent, attr, None)
    if isinstance(old, nn.Module):
        new.train(old.training)
    setattr(parent, attr, new)


def names(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    return [n for n, _ in modules]
