"""A restricted pickle reader for research model files (FLAME, SMPL-style ``.pkl``).

A pickle is a small program: loading one with :func:`pickle.load` can run any callable it
names (``os.system``, ``builtins.eval``, ...). :func:`load_pickle` instead admits only a
fixed list of globals:

- numpy's array and scalar reconstruction helpers (``_reconstruct``, ``scalar``,
  ``_frombuffer``, ``ndarray``, ``dtype``), under both the ``numpy.core`` and the
  ``numpy._core`` module paths;
- scipy.sparse matrix classes (``csc_matrix``, ``csr_matrix``, ``coo_matrix``, ... under their
  public and internal module paths), mapped to :class:`PickledSparse`, which only stores the
  pickled state and can rebuild a real scipy matrix from its arrays on request;
- chumpy classes (``chumpy.ch.Ch``, ``chumpy.reordering.*``, ``chumpy.ch_ops.*``, ...), mapped
  to subclasses of :class:`PickledChumpy`, which only store the pickled state dict; a plain
  ``Ch`` keeps its value in the ``'x'`` entry;
- ``set``/``frozenset``/``object``, a ``copy_reg._reconstructor`` that only builds the stand-ins
  above, and a latin-1-only ``_codecs.encode`` (Python 3 writes ``bytes`` that way at
  protocol 2).

Anything else raises :class:`~faceps.core.errors.ModelError` before it is called.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from faceps.core.errors import ModelError

__all__ = ["load_pickle", "loads_pickle", "as_array", "PickledChumpy", "PickledSparse",
           "RestrictedUnpickler"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class PickledChumpy:
    """Harmless stand-in for a chumpy object found in a pickle.

    It never runs chumpy code: the unpickler creates it empty and hands it the pickled state
    dict, which is kept in :attr:`state`. Subclasses made by :func:`_chumpy_class` record the
    original class name in :attr:`chumpy_name`.
    """

    chumpy_name = "chumpy.ch.Ch"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledChumpy:
        obj = super().__new__(cls)
        obj.args = args
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {"state": state}

    @property
    def value(self) -> np.ndarray:
        """The array the object holds (the ``'x'`` entry of a plain ``Ch``).

        Raises:
            ModelError: when the object is a derived chumpy expression without a stored value.
        """
        x = self.state.get("x")
        if isinstance(x, PickledChumpy):
            return x.value
        if x is None:
            raise ModelError(f"a {self.chumpy_name} object holds no stored value ('x'); "
                             f"derived chumpy expressions are not supported")
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise ModelError(f"a {self.chumpy_name} object holds a non-numeric value "
                             f"({arr.dtype})")
        return arr

    def __repr__(self) -> str:
        return f"<pickled {self.chumpy_name} with keys {sorted(self.state)}>"


class PickledSparse:
    """Harmless stand-in for a scipy.sparse matrix found in a pickle.

    Keeps the pickled state dict in :attr:`state`; :meth:`to_scipy` rebuilds a real matrix of
    the recorded format from its ``data``/``indices``/``indptr`` (or ``row``/``col``) arrays.
    """

    sparse_format = "csc"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledSparse:
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {"state": state}

    def to_scipy(self) -> sp.spmatrix:
        """The matrix as a scipy.sparse matrix.

        Raises:
            ModelError: when the pickled state lacks the arrays of its format.
        """
        s = self.state
        shape = s.get("_shape", s.get("shape"))
        fmt = str(s.get("format", self.sparse_format))
        try:
            shape = tuple(int(n) for n in shape)
            if fmt in ("csc", "csr", "bsr"):
                parts = (np.asarray(s["data"]), np.asarray(s["indices"]), np.asarray(s["indptr"]))
                cls = {"csc": sp.csc_matrix, "csr": sp.csr_matrix, "bsr": sp.bsr_matrix}[fmt]
                return cls(parts, shape=shape)
            if fmt == "coo":
                coords = s.get("coords") or (s["row"], s["col"])
                return sp.coo_matrix((np.asarray(s["data"]), tuple(np.asarray(c) for c in coords)),
                                     shape=shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"a pickled {fmt} sparse matrix is incomplete ({exc})") from None
        raise ModelError(f"pickled sparse matrices of format '{fmt}' are not supported")


def as_array(obj: Any, what: str) -> np.ndarray:
    """A numeric ndarray from a value read by :func:`load_pickle`.

    Accepts an ndarray, a :class:`PickledChumpy` holding one, or a :class:`PickledSparse`
    (densified); ``what`` names the value in the error message.
    """
    if isinstance(obj, PickledChumpy):
        try:
            return obj.value
        except ModelError as exc:
            raise ModelError(f"'{what}': {exc}") from None
    if isinstance(obj, PickledSparse):
        return np.asarray(obj.to_scipy().toarray())
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return obj
    if isinstance(obj, (list, tuple)):
        arr = np.asarray(obj)
        if arr.dtype.kind in "biuf":
            return arr
    raise ModelError(f"'{what}' is not a numeric array (got {type(obj).__name__})")


# ------------------------------------------------------------------ allowed globals
_chumpy_classes: dict[str, type] = {}
_sparse_classes: dict[str, type] = {}

_CHUMPY_MODULES = {"chumpy", "chumpy.ch", "chumpy.reordering", "chumpy.ch_ops", "chumpy.linalg",
                   "chumpy.logic", "chumpy.utils"}
_SPARSE_MODULES = {"scipy.sparse", "scipy.sparse.csc", "scipy.sparse.csr", "scipy.sparse.coo",
                   "scipy.sparse.bsr", "scipy.sparse._csc", "scipy.sparse._csr",
                   "scipy.sparse._coo", "scipy.sparse._bsr", "scipy.sparse.compressed",
                   "scipy.sparse._compressed", "scipy.sparse.base", "scipy.sparse._base",
                   "scipy.sparse._arrays"}
_SPARSE_NAMES = {"csc_matrix": "csc", "csr_matrix": "csr", "coo_matrix": "coo",
                 "bsr_matrix": "bsr", "csc_array": "csc", "csr_array": "csr",
                 "coo_array": "coo", "bsr_array": "bsr"}


def _chumpy_class(qualified: str) -> type:
    if qualified not in _chumpy_classes:
        _chumpy_classes[qualified] = type(
            "PickledChumpy_" + qualified.rsplit(".", 1)[-1], (PickledChumpy,),
            {"chumpy_name": qualified, "__module__": __name__})
    return _chumpy_classes[qualified]


def _sparse_class(fmt: str) -> type:
    if fmt not in _sparse_classes:
        _sparse_classes[fmt] = type(f"PickledSparse_{fmt}", (PickledSparse,),
                                    {"sparse_format": fmt, "__module__": __name__})
    return _sparse_classes[fmt]


def _stand_in(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, (PickledChumpy, PickledSparse))


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copy_reg._reconstructor`` limited to the stand-in classes (protocol 0/1 pickles)."""
    if not _stand_in(cls) or base is not object or state is not None:
        raise ModelError(f"pickle reconstructs a disallowed object ({cls!r} from {base!r})")
    return cls.__new__(cls)


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to latin-1 (how Python 3 pickles bytes at protocol 2)."""
    norm = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(text, str) or norm not in ("latin1", "iso88591", "l1"):
        raise ModelError(f"pickle calls _codecs.encode with a disallowed codec '{encoding}'")
    return text.encode("latin-1", errors="strict")


def _numpy_helpers() -> dict[str, Any]:
    helpers = {
        "_reconstruct": np.zeros(0).__reduce__()[0],
        "scalar": np.float64(0).__reduce__()[0],
    }
    reduced = np.zeros(1).__reduce_ex__(5)[0]
    if getattr(reduced, "__name__", "") == "_frombuffer":
        helpers["_frombuffer"] = reduced
    return helpers


_NUMPY = _numpy_helpers()
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("__builtin__", "set"): set, ("builtins", "set"): set,
    ("__builtin__", "frozenset"): frozenset, ("builtins", "frozenset"): frozenset,
    ("__builtin__", "object"): object, ("builtins", "object"): object,
    ("copy_reg", "_reconstructor"): _reconstructor, ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _NUMPY["_reconstruct"]
    _ALLOWED[(_mod, "scalar")] = _NUMPY["scalar"]
if "_frombuffer" in _NUMPY:
    for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
        _ALLOWED[(_mod, "_frombuffer")] = _NUMPY["_frombuffer"]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only the globals listed in the module doc."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module in _CHUMPY_MODULES and _IDENT.match(name):
            return _chumpy_class(f"{module}.{name}")
        if module in _SPARSE_MODULES and name in _SPARSE_NAMES:
            return _sparse_class(_SPARSE_NAMES[name])
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            # numpy >= 1.25 may name a dtype class; any of them only describes an element type.
            import numpy.dtypes as npd

            cls = getattr(npd, name, None)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        raise ModelError(f"pickle refers to '{module}.{name}', which is not allowed "
                         f"(faceps reads only numpy arrays, scipy sparse matrices and chumpy "
                         f"values from pickles)")

    def persistent_load(self, pid: Any) -> Any:
        raise ModelError("pickle uses persistent ids, which are not allowed")


def loads_pickle(data: bytes, *, name: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding='latin1'``).

    Raises:
        ModelError: naming ``name`` and the reason, for disallowed globals and for any
            malformed pickle.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except ModelError as exc:
        raise ModelError(f"{name}: {exc}") from None
    except MemoryError:
        raise ModelError(f"{name}: malformed pickle (it asks for more memory than "
                         f"available)") from None
    except RecursionError:
        raise ModelError(f"{name}: malformed pickle (nested too deeply)") from None
    except Exception as exc:  # any failure while decoding untrusted bytes is a bad file
        raise ModelError(f"{name}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_pickle(path: str | os.PathLike) -> Any:
    """Read a pickle file without running code from it (see the module doc).

    Raises:
        ModelError: naming the file, when it is missing, malformed, or refers to a
            disallowed global.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: file not found")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc})") from None
    return loads_pickle(data, name=str(p))
