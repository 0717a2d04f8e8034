"""Grid expansion: a study's recipe templates times its models, as stable runs.

A recipe template expands over its grid::

    recipes:
      - name: cubic$sparsity-$format
        grid:
          sparsity: [0.5, 0.75]  # an axis: a list of values, or a mapping label: value
          format: {fp32: null, int8: {weights: int8, activations: int8}}
        steps:
          - prune: {sparsity: $sparsity, schedule: cubic}
          - finetune: {max_steps: 100, lr: 5.0e-4, distill: $distill}
          - quantize: $format    # a step that comes out null is left out
      - name: svd$r
        models: [vit-nano]       # only for these models (default: all)
        grid: {r: [0.5, 0.25]}
        steps:
          - lowrank: {rank_ratio: $r}

Substitution in a recipe template: a value that is exactly ``$axis`` becomes that axis' value (a
number, a mapping, null); ``$axis`` (or ``${axis}``) inside a longer string becomes the value's
label (the mapping key, or the value itself). Every combination of the axes is one recipe, in file
order. Built-in variables: ``$distill`` is ``{teacher: <the model's teacher>, kind: <its distill
kind>}`` for a model trained with a teacher and null otherwise (so a fine-tune distils exactly when
the baseline did), ``$teacher`` the teacher run (or null), ``$model`` the model label. A step that
comes out null is left out; the rest is a recipe as :mod:`vitcompress.steps.recipe` reads it.

A teacher trained by the study is written ``@baseline:<hash>`` in a recipe until a run is given to
a worker: its directory depends on the output directory, which must not enter the run's id.

Runs get stable ids ``<model>-<recipe>-<hash>``: the hash of the resolved run (baseline, data,
limit, seed, recipe after substitution), never of the output directory, so the same study gives
the same ids in every process.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vitcompress.config import check_keys
from vitcompress.errors import VitcompressError
from vitcompress.studies.study import (
    Baseline,
    RunSpec,
    Study,
    digest,
    read_study,
    resolve_models,
    safe_name,
)

RECIPE_KEYS = ("name", "description", "grid", "steps", "models")
BUILTIN_VARS = ("distill", "teacher", "model")
TEACHER_MARK = "@baseline:"  # a teacher reference inside a recipe, resolved to a path at run time

Axis = tuple[str, list[tuple[str, Any]]]  # name, [(label, value), ...]
Template = tuple[str, dict, list[Axis]]  # where (for errors), the template, its axes

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(obj: Any, values: dict[str, Any], labels: dict[str, str], where: str) -> Any:
    """``obj`` with ``$axis`` replaced: by the value where it is the whole string, else by the
    value's label."""
    if isinstance(obj, str):
        whole = _VAR.fullmatch(obj)
        if whole:
            name = whole.group(1) or whole.group(2)
            if name not in values:
                raise VitcompressError(f"{where}: ${name} is not an axis of its grid")
            return values[name]

        def label(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            if name not in labels:
                raise VitcompressError(f"{where}: ${name} is not an axis of its grid")
            return labels[name]

        return _VAR.sub(label, obj)
    if isinstance(obj, Mapping):
        return {k: substitute(v, values, labels, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, values, labels, where) for v in obj]
    return obj


def label_of(v: Any) -> str:
    """How a value reads inside a name: ``none``, ``true``/``false``, or ``str(v)``."""
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def axes(grid: Any, where: str) -> list[Axis]:
    """A template's grid as (axis, [(label, value), ...]) in file order, checked."""
    if grid is None:
        return []
    if not isinstance(grid, Mapping):
        raise VitcompressError(f"{where}: grid must be a mapping of axis: values")
    out = []
    for name, vals in grid.items():
        if not re.fullmatch(r"\w+", str(name)):
            raise VitcompressError(f"{where}: grid axis {name!r} must be a plain word")
        if name in BUILTIN_VARS:
            raise VitcompressError(f"{where}: grid axis {name!r} is a built-in variable")
        if isinstance(vals, Mapping):
            items = [(str(k), v) for k, v in vals.items()]
        elif isinstance(vals, list):
            for v in vals:
                if isinstance(v, (Mapping, list)):
                    raise VitcompressError(
                        f"{where}: grid axis {name!r} lists a {type(v).__name__}; give such "
                        "values labels: {label: value, ...}"
                    )
            items = [(label_of(v), v) for v in vals]
        else:
            items = [(label_of(vals), vals)]
        if not items:
            raise VitcompressError(f"{where}: grid axis {name!r} has no values")
        out.append((str(name), items))
    return out


def uses(obj: Any) -> set[str]:
    """The variables ``obj`` mentions (``$name`` or ``${name}``), anywhere inside it."""
    if isinstance(obj, str):
        return {m.group(1) or m.group(2) for m in _VAR.finditer(obj)}
    if isinstance(obj, Mapping):
        return set().union(*(uses(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(uses(v) for v in obj)) if obj else set()
    return set()


def product(grid_axes: list[Axis]) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """Every combination of the axes, the last axis varying fastest: (values, labels)."""
    names = [a for a, _ in grid_axes]
    for combo in itertools.product(*(items for _, items in grid_axes)):
        yield (
            dict(zip(names, (v for _, v in combo), strict=True)),
            dict(zip(names, (lab for lab, _ in combo), strict=True)),
        )


# A study is a plan a person reads: a grid past this many recipe combinations (before models and
# data multiply it) is a mistake, and expanding it would take the machine's memory.
MAX_RUNS = 20_000


def templates(doc: Mapping, src: str) -> list[Template]:
    """(where, template, axes) for every recipe template, checked."""
    recipes = doc.get("recipes")
    if not isinstance(recipes, list) or not recipes:
        raise VitcompressError(f"{src}: 'recipes' must be a non-empty list of recipe templates")
    out = []
    total = 0
    for i, t in enumerate(recipes):
        where = f"{src}: recipes[{i}]"
        if not isinstance(t, Mapping):
            raise VitcompressError(f"{where}: expected a mapping with name, steps and grid")
        if "name" in t:
            where = f"{src}: recipe {t['name']!r}"
        check_keys(t, RECIPE_KEYS, where)
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise VitcompressError(f"{where}: 'name' is required (a string, may use $axis)")
        if not isinstance(t.get("steps"), list) or not t["steps"]:
            raise VitcompressError(f"{where}: 'steps' must be a non-empty list")
        t_axes = axes(t.get("grid"), where)
        names = {a for a, _ in t_axes}
        unused = names - uses(t["steps"]) - uses(t["name"])
        if unused:
            raise VitcompressError(f"{where}: grid axis {sorted(unused)[0]!r} is used nowhere")
        combos = math.prod(len(values) for _, values in t_axes)  # counted, never listed
        total += combos
        if total > MAX_RUNS:
            raise VitcompressError(
                f"{where}: the study expands to more than {MAX_RUNS:,} recipes; split it"
            )
        if t_axes and not (names & uses(t["name"])) and combos > 1:
            raise VitcompressError(f"{where}: the name must use an axis ($axis) to tell runs apart")
        out.append((where, dict(t), t_axes))
    return out


def _teacher_for_parse(obj: Any) -> Any:
    """The recipe with symbolic teachers replaced by ``self``, for validation only."""
    if isinstance(obj, str) and obj.startswith(TEACHER_MARK):
        return "self"
    if isinstance(obj, Mapping):
        return {k: _teacher_for_parse(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_teacher_for_parse(v) for v in obj]
    return obj


def resolve_teachers(obj: Any, directory: Callable[[str], Path | str]) -> Any:
    """Replace symbolic teachers (``@baseline:<hash>``) with ``directory(hash)`` (a path)."""
    if isinstance(obj, str) and obj.startswith(TEACHER_MARK):
        return str(directory(obj[len(TEACHER_MARK) :]))
    if isinstance(obj, Mapping):
        return {k: resolve_teachers(v, directory) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_teachers(v, directory) for v in obj]
    return obj


def teacher_hashes(recipe: Any) -> set[str]:
    """The baseline hashes a recipe's symbolic teachers name (they must be trained first)."""
    return set(re.findall(re.escape(TEACHER_MARK) + r"(\w+)", json.dumps(recipe)))


def _builtin_vars(label: str, base: Baseline, baselines: Mapping[str, Baseline]) -> dict:
    teacher = base.teacher
    teacher_ref = (
        None if teacher is None else (TEACHER_MARK + teacher if teacher in baselines else teacher)
    )
    return {
        "distill": None if teacher_ref is None else {"teacher": teacher_ref, "kind": base.distill},
        "teacher": teacher_ref,
        "model": label,
    }


def expand_study(study: str | Path | Mapping, data: str | None = None) -> Study:
    """Read and check a study, and expand it into its baselines and runs (nothing is run).

    ``data`` replaces the study's data spec(s). Any problem is a one-line
    :class:`VitcompressError` naming the file and the key.
    """
    from vitcompress.steps.recipe import parse_recipe

    doc, settings = read_study(study, data)
    src, name, seed, models = settings.source, settings.name, settings.seed, doc["models"]
    t_list = templates(doc, src)

    baselines: dict[str, Baseline] = {}
    runs: list[RunSpec] = []
    seen: dict[str, str] = {}
    for spec in settings.data:
        bls, by_label = resolve_models(doc, src, spec, settings.limit, seed)
        baselines.update(bls)
        for label in models:
            base = bls[by_label[str(label)]]
            builtins = _builtin_vars(str(label), base, bls)
            for where, t, t_axes in t_list:
                only = t.get("models")
                if only is not None:
                    only = [only] if isinstance(only, str) else only
                    bad = [m for m in only if m not in models]
                    if bad:
                        raise VitcompressError(f"{where}: models: {bad[0]!r} is not a model label")
                    if label not in only:
                        continue
                for values, labels in product(t_axes):
                    values = {**builtins, **values}
                    labels = {**{k: label_of(v) for k, v in builtins.items()}, **labels}
                    rname = substitute(t["name"], labels, labels, where)
                    steps = [
                        s
                        for s in substitute(t["steps"], values, labels, where)
                        if not (isinstance(s, Mapping) and len(s) == 1 and None in s.values())
                    ]
                    if not steps:
                        raise VitcompressError(f"{where}: recipe {rname!r} has no steps left")
                    recipe = {"name": rname, "steps": steps}
                    what = f"recipe {rname!r}"
                    try:
                        parse_recipe(_teacher_for_parse(recipe), what)
                    except VitcompressError as e:
                        msg = str(e) if str(e).startswith(what) else f"{what}: {e}"
                        raise VitcompressError(f"{src}: {msg}") from None
                    # the run's identity: never its output directory, so ids are the same anywhere
                    config = {
                        "model": str(label),
                        "baseline": base.hash,
                        "data": spec,
                        "limit": base.limit,
                        "seed": seed,
                        "recipe": recipe,
                    }
                    rid = f"{safe_name(str(label))}-{safe_name(rname)}-{digest(config, 8)}"
                    key = f"{label}/{rname}/{spec}"
                    if key in seen:
                        raise VitcompressError(
                            f"{where}: recipe name {rname!r} comes out twice for model {label}; "
                            "put every axis in the name"
                        )
                    seen[key] = rid
                    runs.append(
                        RunSpec(
                            id=rid,
                            study=name,
                            model=str(label),
                            recipe_name=rname,
                            recipe=recipe,
                            baseline=base.hash,
                            data=spec,
                            family=base.family,
                            size=base.size,
                            preset=base.preset,
                            config=config,
                        )
                    )
    return Study(name, src, runs, baselines, settings.device, settings.speed, settings.resources)
