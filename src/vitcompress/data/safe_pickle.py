"""A pickle reader that builds only numpy arrays, dtypes and plain containers, and no more of
them than a budget allows (CIFAR-10's python batches are pickles).

Pickle can run any code it names, so the classes a file may name are a table: anything else is
refused before it is called. Pickle can also build far more than it holds:
``bytes(2_000_000_000)`` is a few bytes of pickle, and so are a thousand copies of one large list
or a tuple nested a million deep (whose hash overflows the C stack: a crash, not an exception).
So this is pickle's own pure-Python unpickler with its object-building opcodes checked:

- every opcode and every allowed call is charged against a budget (bytes) before it runs: an
  opcode :data:`OP_COST` (more than the largest object one opcode makes), a call what it builds
  (``bytes(n)``: n, ``_reconstruct(ndarray, shape, dtype)``: its array, ``list(x)``:
  :data:`ITEM_COST` per item);
- arrays and dtypes are built only the way numpy pickles them: no object dtypes, fields or
  sub-arrays, items of at most :data:`MAX_ITEMSIZE` bytes, array data of exactly the size its
  shape says (numpy allocates an object array's shape before it reads its items);
- ``NEWOBJ`` (``cls.__new__``, past the checks) is refused, ``BUILD`` applies only to arrays and
  dtypes, ``SETITEM(S)``/``APPEND(S)``/``ADDITEMS`` only to dicts, lists and sets (a bytearray's
  ``ba[0:0] = big`` grows by ``big`` per opcode), and dict keys and set items are flat (strings,
  numbers, flat tuples).
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from vitcompress.errors import VitcompressError

OP_COST = 256
ITEM_COST = 128  # an object and its slot in the container
MAX_ITEMSIZE = 1024  # bytes per array element
_LATIN1 = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1"})
_TEXT = _LATIN1 | {"utf-8", "utf8", "ascii"}
_FLAT = (str, bytes, int, float, complex, bool, type(None), np.generic)


class PickleRefused(VitcompressError):
    """What the restricted unpickler will not build (the message says what)."""


def _modules() -> tuple[Any, Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` for the one use pickle makes of it: a str to latin-1 bytes (an
    encoding such as hex doubles its input, and calls can be nested)."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise PickleRefused("_codecs.encode only turns a str into latin-1 bytes (as pickle does)")
    return obj.encode("latin-1", errors if isinstance(errors, str) else "strict")


def _allowed() -> dict[tuple[str, str], Any]:
    """The names a file may use: numpy's pickling functions, plain types, pickle's bytes."""
    multiarray, numeric = _modules()
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for pkg in ("numpy.core", "numpy._core"):  # the name depends on the numpy that wrote the file
        table[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    for mod in ("builtins", "__builtin__"):
        for t in (bytes, bytearray, list, dict, tuple, set, frozenset, int, float, complex, str):
            table[(mod, t.__name__)] = t
    table[("_codecs", "encode")] = _codecs_encode  # how protocol 2 spells bytes from Python 3
    return table


# ---------------------------------------------------------------- what each call may build


def _length(x: Any) -> int:
    if isinstance(x, (memoryview, np.ndarray)):
        return x.nbytes
    try:
        return len(x)
    except TypeError:
        raise PickleRefused(f"cannot size an argument of type {type(x).__name__}") from None


def _flat_keys(keys: Any) -> None:
    """Refuse dict keys or set items that are not flat: hashing a deeply nested tuple recurses
    in C without a limit."""
    for k in keys:
        if isinstance(k, (tuple, frozenset)):
            if not all(isinstance(x, _FLAT) for x in k):
                raise PickleRefused(
                    "dict keys and set items must be strings, numbers or flat tuples"
                )
        elif not isinstance(k, _FLAT):
            raise PickleRefused(f"a {type(k).__name__} cannot be a dict key or a set item")


def check_dtype(d: Any) -> np.dtype:
    """``d`` as a dtype with no objects, fields or sub-arrays and items of a few bytes."""
    if not isinstance(d, np.dtype):
        if not isinstance(d, (str, bytes)) or len(d) > 16:  # "u1", "<f8", "V8", "S10", ...
            raise PickleRefused(f"a dtype is given by a short type code, not a {type(d).__name__}")
        d = np.dtype(d)
    if d.hasobject or d.names is not None or d.subdtype is not None or d.itemsize > MAX_ITEMSIZE:
        raise PickleRefused(f"refusing dtype {str(d)[:60]}: only arrays of plain numbers")
    return d


def _numel(shape: Any) -> int:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    if not isinstance(dims, tuple) or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in dims
    ):
        raise PickleRefused("an array shape must be a tuple of integers >= 0")
    return math.prod(int(n) for n in dims)


# Each check charges what its call builds, then checks what is left to check (after the
# charge: a walk over a large argument is paid for before it is made).
Check = Callable[["_Unpickler", tuple], None]


def _check_bytes(u: _Unpickler, args: tuple) -> None:  # bytes(x), bytearray(x)
    x = args[0] if args else b""
    if isinstance(x, (int, np.integer)):
        u.charge(int(x))
    elif isinstance(x, str):
        if len(args) < 2 or not isinstance(args[1], str) or args[1].lower() not in _TEXT:
            raise PickleRefused("bytes from a str only in latin-1, utf-8 or ascii")
        u.charge(4 * len(x))
    else:
        u.charge(_length(x))


def _check_items(u: _Unpickler, args: tuple) -> None:  # list, tuple
    u.charge(ITEM_COST * (_length(args[0]) + 1) if args else ITEM_COST)


def _check_set(u: _Unpickler, args: tuple) -> None:  # set, frozenset: the items are hashed
    _check_items(u, args)
    if args:
        _flat_keys(args[0])


def _check_dict(u: _Unpickler, args: tuple) -> None:  # a dict (hashes kept) or (key, value)s
    _check_items(u, args)
    if args and not isinstance(args[0], dict):
        pairs = args[0]
        if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs
        ):
            raise PickleRefused("dict() takes a dict or a list of (key, value) pairs")
        _flat_keys([p[0] for p in pairs])


def _check_number(u: _Unpickler, args: tuple) -> None:  # int, float, complex
    u.charge(64 + sum(len(a) for a in args if isinstance(a, (str, bytes, bytearray))))


def _check_str(u: _Unpickler, args: tuple) -> None:  # str(x): no repr of containers
    x = args[0] if args else ""
    if len(args) > 1 and (not isinstance(args[1], str) or args[1].lower() not in _TEXT):
        raise PickleRefused("str from bytes only in latin-1, utf-8 or ascii")
    if not isinstance(x, (str, bytes, bytearray, int, float, bool)):
        raise PickleRefused(f"str() of a {type(x).__name__}")
    u.charge(64 + (4 * len(x) if isinstance(x, (str, bytes, bytearray)) else 0))


def _check_encode(u: _Unpickler, args: tuple) -> None:
    u.charge(_length(args[0]) if args else 0)


def _check_dtype_call(u: _Unpickler, args: tuple) -> None:
    if not args or not isinstance(args[0], (str, bytes)):
        raise PickleRefused("numpy.dtype is given by a type code")
    u.charge(OP_COST)
    check_dtype(args[0])


def _check_reconstruct(u: _Unpickler, args: tuple) -> None:
    if len(args) != 3 or args[0] is not np.ndarray:
        raise PickleRefused("_reconstruct builds only numpy.ndarray")
    u.charge(_numel(args[1]) * check_dtype(args[2]).itemsize)


def _check_frombuffer(u: _Unpickler, args: tuple) -> None:
    if len(args) < 4 or not isinstance(args[0], (bytes, bytearray, memoryview)):
        raise PickleRefused("_frombuffer reads only a bytes buffer")
    if _numel(args[2]) * check_dtype(args[1]).itemsize != _length(args[0]):
        raise PickleRefused("_frombuffer's shape does not match its buffer")
    u.charge(_length(args[0]))


def _check_scalar(u: _Unpickler, args: tuple) -> None:
    if not args or not isinstance(args[0], np.dtype):
        raise PickleRefused("a numpy scalar needs a dtype")
    u.charge(64 + check_dtype(args[0]).itemsize)


def _refuse_ndarray(u: _Unpickler, args: tuple) -> None:
    raise PickleRefused("numpy.ndarray is built only through _reconstruct (as numpy pickles it)")


def _checks() -> dict[int, Check]:
    """The check of each allowed callable, by its id (no hashing of objects from the file)."""
    multiarray, numeric = _modules()
    checks: dict[Any, Check] = {
        bytes: _check_bytes,
        bytearray: _check_bytes,
        list: _check_items,
        tuple: _check_items,
        set: _check_set,
        frozenset: _check_set,
        dict: _check_dict,
        int: _check_number,
        float: _check_number,
        complex: _check_number,
        str: _check_str,
        _codecs_encode: _check_encode,
        np.dtype: _check_dtype_call,
        np.ndarray: _refuse_ndarray,
        multiarray._reconstruct: _check_reconstruct,
        multiarray.scalar: _check_scalar,
        numeric._frombuffer: _check_frombuffer,
    }
    return {id(f): c for f, c in checks.items()}


def _check_array_state(state: Any) -> int:
    """The ndarray ``__setstate__`` argument as numpy writes it; returns its data's size."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise PickleRefused("an array's state must be (version, shape, dtype, fortran, data)")
    shape, dtype, _, data = state[-4:]
    if not isinstance(dtype, np.dtype) or not isinstance(data, (bytes, bytearray)):
        raise PickleRefused("an array's state holds a dtype and bytes")
    if _numel(shape) * check_dtype(dtype).itemsize != len(data):
        raise PickleRefused("an array's data does not match its shape")
    return len(data)


def _check_dtype_state(d: np.dtype, state: Any) -> None:
    """The dtype ``__setstate__`` argument as numpy writes it for a plain dtype: a byte order,
    no sub-array, names, fields or metadata, the item size and alignment it already has."""
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise PickleRefused("a dtype's state must be numpy's version 3 or 4")
    if state[2:5] != (None, None, None) or (len(state) == 9 and state[8] is not None):
        raise PickleRefused("refusing a dtype with fields, sub-arrays or metadata")
    if state[5] not in (-1, d.itemsize) or state[6] not in (-1, d.alignment):
        raise PickleRefused("a dtype's state may not change its item size")
    if state[1] not in ("<", ">", "=", "|", b"<", b">", b"=", b"|"):
        raise PickleRefused("a dtype's byte order must be one of < > = |")


class _Unpickler(pickle._Unpickler):  # the pure-Python one: its opcodes can be replaced
    _table: dict[tuple[str, str], Any] | None = None
    _checks: dict[int, Check] | None = None

    def __init__(self, raw: bytes, source: str, what: str, budget: int) -> None:
        super().__init__(io.BytesIO(raw), encoding="bytes")  # bytes: how Python 2 wrote str
        self.source, self.what, self.budget = source, what, budget
        if _Unpickler._table is None:
            _Unpickler._table, _Unpickler._checks = _allowed(), _checks()

    def charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise PickleRefused(
                f"refusing to unpickle {self.source}: it builds more than {self.what} of its "
                "size needs (a pickle bomb?)"
            )

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _Unpickler._table[(module, name)]
        except KeyError:
            raise PickleRefused(
                f"refusing to unpickle {module[:60]}.{name[:60]} from {self.source}: "
                f"{self.what} holds only numpy arrays and plain containers"
            ) from None

    def call(self, func: Any, args: Any) -> Any:
        check = _Unpickler._checks.get(id(func))
        if check is None or not isinstance(args, tuple):
            raise PickleRefused(f"refusing to call a {type(func).__name__}")
        check(self, args)
        return func(*args)

    def _target(self) -> Any:
        """What an opcode that ends at a mark adds to (the object just below the mark)."""
        return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ
        self.append(self.call(klass, tuple(args)))

    def load_newobj(self) -> None:
        raise PickleRefused(f"refusing NEWOBJ in {self.source}: it calls cls.__new__ directly")

    def load_build(self) -> None:
        state, inst = self.stack.pop(), self.stack[-1]
        if type(inst) is np.ndarray:
            self.charge(_check_array_state(state))
        elif isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        else:
            raise PickleRefused(f"refusing to set the state of a {type(inst).__name__}")
        inst.__setstate__(state)
        if isinstance(inst, np.dtype):
            check_dtype(inst)

    def load_setitem(self) -> None:
        if type(self.stack[-3]) is not dict:
            raise PickleRefused("SETITEM on something other than a dict")
        _flat_keys((self.stack[-2],))
        super().load_setitem()

    def load_setitems(self) -> None:
        if type(self._target()) is not dict:
            raise PickleRefused("SETITEMS on something other than a dict")
        _flat_keys(self.stack[0::2])  # the items since the mark: key, value, key, value, ...
        super().load_setitems()

    def load_dict(self) -> None:
        _flat_keys(self.stack[0::2])
        super().load_dict()

    def load_additems(self) -> None:
        if type(self._target()) is not set:
            raise PickleRefused("ADDITEMS on something other than a set")
        _flat_keys(self.stack)
        super().load_additems()

    def load_frozenset(self) -> None:
        _flat_keys(self.stack)
        super().load_frozenset()

    def load_appends(self) -> None:
        if type(self._target()) is not list:
            raise PickleRefused("APPENDS on something other than a list")
        super().load_appends()

    def load_append(self) -> None:
        if type(self.stack[-2]) is not list:
            raise PickleRefused("APPEND on something other than a list")
        super().load_append()


def _charged(op: Callable[[Any], None]) -> Callable[[Any], None]:
    def run(u: _Unpickler) -> None:
        u.charge(OP_COST)
        op(u)

    return run


_REPLACED = {
    pickle.REDUCE: _Unpickler.load_reduce,
    pickle.NEWOBJ: _Unpickler.load_newobj,
    pickle.NEWOBJ_EX: _Unpickler.load_newobj,
    pickle.BUILD: _Unpickler.load_build,
    pickle.SETITEM: _Unpickler.load_setitem,
    pickle.SETITEMS: _Unpickler.load_setitems,
    pickle.DICT: _Unpickler.load_dict,
    pickle.ADDITEMS: _Unpickler.load_additems,
    pickle.FROZENSET: _Unpickler.load_frozenset,
    pickle.APPENDS: _Unpickler.load_appends,
    pickle.APPEND: _Unpickler.load_append,
}
_Unpickler.dispatch = {
    code: _charged(_REPLACED.get(bytes([code]), op))
    for code, op in pickle._Unpickler.dispatch.items()
}


def restricted_loads(raw: bytes, source: str, what: str, budget: int) -> Any:
    """Unpickle ``raw`` (bytes keys, as Python 2 wrote str), building at most ``budget`` bytes.

    Args:
        raw: the pickle.
        source: where it comes from, for errors (a path).
        what: what it should hold, for errors ("a CIFAR-10 batch").
        budget: bytes it may build beyond its own strings (module docstring).

    Raises:
        PickleRefused: it names or builds what is not allowed (one line). Any other exception
            means the bytes are not a pickle.
    """
    return _Unpickler(raw, source, what, budget).load()
