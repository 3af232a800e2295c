"""Contract 4 in code: the HDF5 dataset format ``faceps.dataset/1``.

A dataset file has root attributes

- ``format``: ``"faceps.dataset/1"``;
- ``created``: ISO 8601 time the file was written;
- ``generator``: JSON text of the full resolved configuration that produced the data
  (for synthetic builds: seed, sizes, model name and fingerprint, faceps version, ...);
- ``model``: the morphable model name the ``params/*`` coefficients belong to;

and one row per sample in group ``samples/`` (first axis N). Per-sample shapes (DESIGN.md
conventions: camera frame OpenCV, mm, linear radiometry, NaN = no value):

======================  ==================  =======  ==========================================
dataset                 shape               dtype    content
======================  ==================  =======  ==========================================
``images``              (N, L, H, W, 3)     float16  linear intensities, one image per light
``lights``              (N, L, 11)          float32  :data:`faceps.core.lights.LIGHT_ROW` rows
                                                     (intensity already scaled by the exposure,
                                                     so the images follow eq. 1); valid flag 0
                                                     on padding rows of samples with fewer
                                                     lights (their images are zero)
``normals``             (N, H, W, 3)        float16  ground-truth unit normals; NaN outside
``proxy_normals``       (N, H, W, 3)        float16  normals of the coarse 3DMM proxy; NaN
                                                     where the proxy is not seen
``mask``                (N, H, W)           uint8    1 where the pixel sees the rendered head
                                                     surface (exactly where ``normals``,
                                                     ``albedo`` and ``depth`` are finite)
``albedo``              (N, H, W, 3)        float16  linear diffuse albedo; NaN outside
``depth``               (N, H, W)           float32  z in mm; NaN outside
``K``                   (N, 3, 3)           float32  intrinsics of the crop (pixels)
``landmarks``           (N, 68, 2)          float32  iBUG-68 points, pixels of the crop (u, v);
                                                     NaN where the model has no vertex
``params/id``           (N, k_id)           float32  identity coefficients (std units)
``params/exp``          (N, k_exp)          float32  expression coefficients
``params/albedo``       (N, k_alb)          float32  albedo coefficients
``params/pose``         (N, 6)              float32  pitch, yaw, roll (rad), tx, ty, tz (mm)
``subject``             (N,)                str      subject id (UTF-8, variable length)
``source``              (N,)                str      ``synthetic``, ``scan`` or ``real``
======================  ==================  =======  ==========================================

Optional extra datasets (:data:`EXTRAS`; written by the synthetic builder, checked when
present, absent in files of other origins):

======================  ==================  =======  ==========================================
``face_mask``           (N, H, W)           uint8    1 on the model's face region (no neck,
                                                     ears, back of the head); a subset of
                                                     ``mask``
``shadow``              (N, L, H, W)        uint8    1 where light j is blocked by other
                                                     geometry (cast shadow); outside cast
                                                     shadows the diffuse image is eq. 1
``exposure``            (N,)                float32  sensor exposure factor applied to the
                                                     radiance (already inside ``lights``)
``sample_index``        (N,)                int64    global index of the sample in its build
                                                     (its random stream is ``[seed, index]``)
``lighting``            (N,)                str      ``near`` (the point lights of
                                                     ``lights``) or ``wild`` (in-the-wild
                                                     lighting, :mod:`faceps.synth.wild`)
``wild_lighting``       (N, L, 34)          float32  per image of a ``wild`` sample: the 27
                                                     SH coefficients of its environment
                                                     (row-major (9, 3)), a distant light's
                                                     direction and colour and a flag 1 when
                                                     it has one; zero rows for ``near``
                                                     samples and padding. A wild sample's
                                                     ``lights`` rows are all invalid (0):
                                                     its image j is valid when the row's SH
                                                     constant terms (columns 0-2) are > 0
======================  ==================  =======  ==========================================

Any other dataset under ``samples/`` is allowed if its first axis is N.

Storage: every dataset is chunked one sample per chunk (chunk shape ``(1,) + per-sample
shape``) and numeric datasets are compressed with gzip after the shuffle filter (the shuffle
groups the exponent bytes of float16/float32 values, which gzip then finds). Variable-length
strings are chunked one per chunk and stored uncompressed (HDF5 would only compress their
heap pointers). A per-sample shape with a zero size (a model without albedo modes gives
``params/albedo`` of shape (N, 0)) is stored contiguous, since HDF5 chunks cannot be empty.

A dataset may also be an *index*: a file with the same root attributes whose ``samples/``
datasets are HDF5 virtual datasets mapping rows onto shard files (each a complete
contract-4 file) by paths relative to the index's folder, so the folder can move.
:func:`create_virtual_index` writes one; :func:`validate_file` checks that every shard
it maps exists and is itself valid.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from faceps.core.errors import DatasetError

__all__ = [
    "FORMAT",
    "SAMPLES",
    "GZIP_LEVEL",
    "Field",
    "FIELDS",
    "REQUIRED",
    "EXTRAS",
    "ROOT_ATTRS",
    "DatasetSummary",
    "field_shape",
    "create_file",
    "create_virtual_index",
    "validate_file",
    "read_sample",
    "encode_chunk",
    "write_chunk",
    "now_iso",
]

FORMAT = "faceps.dataset/1"
SAMPLES = "samples"
#: gzip level of the numeric datasets (measured with bench/bench_dataset.py at 256 x 256,
#: 3 lights: level 1 stores 1.19 MiB per sample (2.4x smaller than raw); levels 2-4 save
#: 1-4 % more and take up to 35 % longer, since the float16 images with sensor noise
#: dominate and hardly compress further)
GZIP_LEVEL = 1
#: root attributes every dataset file carries
ROOT_ATTRS = ("format", "created", "generator", "model")
#: allowed values of ``source``
SOURCES = ("synthetic", "scan", "real")

STRING = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Field:
    """One dataset of ``samples/``.

    Attributes:
        name: path under ``samples/`` (e.g. ``images``, ``params/id``).
        shape: per-sample shape (after the N axis); strings name sizes shared across
            fields: ``L`` lights, ``H``/``W`` image size, ``k_id``/``k_exp``/``k_alb``
            model coefficient counts.
        dtype: numpy dtype, or :data:`STRING` for variable-length UTF-8 text.
        required: part of contract 4 (missing -> :class:`DatasetError`).
        fill: value of rows that no shard maps (virtual index) and of padding.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: Any
    required: bool = True
    fill: Any = 0

    @property
    def path(self) -> str:
        return f"{SAMPLES}/{self.name}"

    @property
    def is_string(self) -> bool:
        return self.dtype is STRING


#: contract 4 plus the optional extras, in writing order
FIELDS: tuple[Field, ...] = (
    Field("images", ("L", "H", "W", 3), np.dtype(np.float16), fill=0.0),
    Field("lights", ("L", 11), np.dtype(np.float32), fill=0.0),
    Field("normals", ("H", "W", 3), np.dtype(np.float16), fill=np.nan),
    Field("proxy_normals", ("H", "W", 3), np.dtype(np.float16), fill=np.nan),
    Field("mask", ("H", "W"), np.dtype(np.uint8), fill=0),
    Field("albedo", ("H", "W", 3), np.dtype(np.float16), fill=np.nan),
    Field("depth", ("H", "W"), np.dtype(np.float32), fill=np.nan),
    Field("K", (3, 3), np.dtype(np.float32), fill=0.0),
    Field("landmarks", (68, 2), np.dtype(np.float32), fill=np.nan),
    Field("params/id", ("k_id",), np.dtype(np.float32), fill=0.0),
    Field("params/exp", ("k_exp",), np.dtype(np.float32), fill=0.0),
    Field("params/albedo", ("k_alb",), np.dtype(np.float32), fill=0.0),
    Field("params/pose", (6,), np.dtype(np.float32), fill=0.0),
    Field("subject", (), STRING, fill=""),
    Field("source", (), STRING, fill=""),
    Field("face_mask", ("H", "W"), np.dtype(np.uint8), required=False, fill=0),
    Field("shadow", ("L", "H", "W"), np.dtype(np.uint8), required=False, fill=0),
    Field("exposure", (), np.dtype(np.float32), required=False, fill=np.nan),
    Field("sample_index", (), np.dtype(np.int64), required=False, fill=-1),
    Field("lighting", (), STRING, required=False, fill=""),
    Field("wild_lighting", ("L", 34), np.dtype(np.float32), required=False, fill=0.0),
)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
REQUIRED = tuple(f.name for f in FIELDS if f.required)
EXTRAS = tuple(f.name for f in FIELDS if not f.required)


def now_iso() -> str:
    """The current UTC time as ISO 8601 text (seconds)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def field_shape(f: Field, dims: Mapping[str, int]) -> tuple[int, ...]:
    """Per-sample shape of a field for concrete sizes ``dims`` (keys L, H, W, k_*)."""
    return tuple(int(dims[s]) if isinstance(s, str) else int(s) for s in f.shape)


def _dims(L: int, H: int, W: int, k_id: int, k_exp: int, k_alb: int) -> dict[str, int]:
    dims = {"L": L, "H": H, "W": W, "k_id": k_id, "k_exp": k_exp, "k_alb": k_alb}
    for key, v in dims.items():
        if int(v) != v or v < (1 if key in ("L", "H", "W") else 0):
            raise DatasetError(f"invalid dataset size {key}={v}")
    return {k: int(v) for k, v in dims.items()}


def _attr_value(value: Any) -> Any:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True)
    return value


def _write_root_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    if "generator" not in attrs or "model" not in attrs:
        raise DatasetError("root attributes 'generator' and 'model' are required")
    f.attrs["format"] = FORMAT
    f.attrs["created"] = str(attrs.get("created") or now_iso())
    for key, value in attrs.items():
        if key in ("format", "created"):
            continue
        f.attrs[key] = _attr_value(value)


def create_file(path: str | os.PathLike, n: int, L: int, H: int, W: int, k_id: int,
                k_exp: int, k_alb: int, attrs: Mapping[str, Any], *,
                extras: Iterable[str] = EXTRAS, compression: int = GZIP_LEVEL) -> h5py.File:
    """Create an empty contract-4 file with every dataset allocated; the caller fills rows
    and closes the returned file.

    Args:
        path: file to create (truncated if it exists; write to a temporary name and rename,
            see :func:`faceps.core.atomic.atomic_path`, to keep final names whole).
        n: number of samples N (>= 1).
        L, H, W: lights per sample and image size.
        k_id, k_exp, k_alb: coefficient counts of ``params/id``, ``params/exp``,
            ``params/albedo`` (0 allowed).
        attrs: root attributes; ``generator`` (a dict, stored as JSON) and ``model`` are
            required, ``created`` defaults to now, ``format`` is always :data:`FORMAT`;
            further entries are stored too (dicts and lists as JSON text).
        extras: which optional :data:`EXTRAS` datasets to create.
        compression: gzip level 1-9 of numeric datasets (with the shuffle filter).

    Returns:
        the open ``h5py.File`` (mode ``w``).

    Raises:
        DatasetError: for invalid sizes, unknown extras or missing attributes.
    """
    if int(n) != n or n < 1:
        raise DatasetError(f"{path}: a dataset needs n >= 1 samples; got {n}")
    if not 1 <= int(compression) <= 9:
        raise DatasetError(f"gzip level must be in 1..9; got {compression}")
    dims = _dims(L, H, W, k_id, k_exp, k_alb)
    extras = tuple(extras)
    for name in extras:
        if name not in EXTRAS:
            raise DatasetError(f"unknown extra dataset '{name}'; known: {', '.join(EXTRAS)}")
    f = h5py.File(path, "w")
    try:
        _write_root_attrs(f, attrs)
        f.create_group(SAMPLES)
        for fld in FIELDS:
            if not fld.required and fld.name not in extras:
                continue
            shape = field_shape(fld, dims)
            full = (int(n),) + shape
            kwargs: dict[str, Any] = {}
            if all(shape):
                kwargs["chunks"] = (1,) + shape
                if not fld.is_string:
                    kwargs.update(compression="gzip", compression_opts=int(compression),
                                  shuffle=True)
            if not fld.is_string:
                kwargs["fillvalue"] = fld.fill
            f.create_dataset(fld.path, shape=full, dtype=fld.dtype, **kwargs)
    except BaseException:
        f.close()
        raise
    return f


def create_virtual_index(path: str | os.PathLike, shards: Sequence[tuple[str, int]], L: int,
                         H: int, W: int, k_id: int, k_exp: int, k_alb: int,
                         attrs: Mapping[str, Any], *, extras: Iterable[str] = EXTRAS) -> None:
    """Write a contract-4 index file whose ``samples/`` datasets are virtual datasets that
    concatenate the rows of shard files.

    Args:
        path: the index file to write (written in place; wrap it in
            :func:`faceps.core.atomic.atomic_path` for an atomic write).
        shards: (file name relative to the index's folder, row count) per shard, in order.
        L, H, W, k_id, k_exp, k_alb: sizes shared by all shards.
        attrs: root attributes as for :func:`create_file`.
        extras: the optional datasets the shards hold.
    """
    dims = _dims(L, H, W, k_id, k_exp, k_alb)
    extras = tuple(extras)
    n = sum(int(c) for _, c in shards)
    if n < 1:
        raise DatasetError(f"{path}: an index needs at least one sample")
    with h5py.File(path, "w") as f:
        _write_root_attrs(f, attrs)
        f.create_group(SAMPLES)
        for fld in FIELDS:
            if not fld.required and fld.name not in extras:
                continue
            shape = field_shape(fld, dims)
            if not all(shape):
                f.create_dataset(fld.path, shape=(n,) + shape, dtype=fld.dtype)
                continue
            layout = h5py.VirtualLayout(shape=(n,) + shape, dtype=fld.dtype)
            start = 0
            for name, count in shards:
                src = h5py.VirtualSource(str(name), fld.path, shape=(int(count),) + shape,
                                         dtype=fld.dtype)
                layout[start:start + int(count)] = src
                start += int(count)
            f.create_virtual_dataset(fld.path, layout,
                                     fillvalue=None if fld.is_string else fld.fill)


# ------------------------------------------------------------------ chunk encoding
def encode_chunk(array: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """One sample of a numeric dataset encoded as :func:`create_file`'s filter pipeline
    stores it: HDF5 shuffle (byte j of element i moves to j * count + i) then deflate
    (a zlib stream). Lets worker processes compress in parallel; the writer stores the
    bytes with :func:`write_chunk`.

    Args:
        array: the sample's row, exactly the dataset's per-sample shape and dtype.
        level: gzip level, the dataset's ``compression_opts``.

    Returns:
        the chunk bytes.
    """
    a = np.ascontiguousarray(array)
    raw = a.view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes()
    return zlib.compress(raw, int(level))


def write_chunk(ds: h5py.Dataset, row: int, chunk: bytes, nbytes: int) -> None:
    """Store a chunk made by :func:`encode_chunk` as sample ``row`` of ``ds``.

    Args:
        ds: a dataset created by :func:`create_file` (one sample per chunk, shuffle + gzip).
        row: the sample's row.
        chunk: the encoded bytes.
        nbytes: the row's uncompressed size, checked against the dataset's chunk size.

    Raises:
        DatasetError: when the row does not fit the dataset's chunk shape and dtype.
    """
    chunks = ds.chunks
    expect = int(np.prod(chunks)) * ds.dtype.itemsize if chunks else -1
    if chunks is None or chunks[0] != 1 or nbytes != expect or ds.compression != "gzip":
        raise DatasetError(f"{ds.file.filename}: dataset '{ds.name.lstrip('/')}': cannot store "
                           f"a pre-encoded row of {nbytes} bytes (chunks {chunks}, "
                           f"{ds.dtype}, compression {ds.compression})")
    ds.id.write_direct_chunk((int(row),) + (0,) * (ds.ndim - 1), chunk, filter_mask=0)


# ------------------------------------------------------------------ validation
@dataclass
class DatasetSummary:
    """What :func:`validate_file` found.

    Attributes:
        path: the file.
        n, n_lights, height, width: N, L, H, W.
        k_id, k_exp, k_alb: coefficient counts.
        created, model: root attributes; generator: the parsed ``generator`` JSON.
        attrs: every root attribute (strings and numbers as stored).
        datasets: name under ``samples/`` -> (shape, dtype text).
        extras: the optional datasets present (known extras and any others).
        virtual: True for an index of virtual datasets.
        shards: the shard files an index maps (empty for a plain file).
        file_bytes: size on disk of the file plus its shards.
    """

    path: Path
    n: int
    n_lights: int
    height: int
    width: int
    k_id: int
    k_exp: int
    k_alb: int
    created: str
    model: str
    generator: dict
    attrs: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    virtual: bool = False
    shards: tuple[Path, ...] = ()
    file_bytes: int = 0


def _fail(path: Path, message: str, dataset: str | None = None) -> DatasetError:
    where = f"{path}: dataset '{dataset}'" if dataset else str(path)
    return DatasetError(f"{where}: {message}")


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise _fail(path, "no such file")
    if not path.is_file():
        raise _fail(path, "not a file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _fail(path, f"not a readable HDF5 file ({exc})") from None


def _attr_text(f: h5py.File, path: Path, key: str) -> str:
    if key not in f.attrs:
        raise _fail(path, f"root attribute '{key}' is missing")
    value = f.attrs[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _fail(path, f"root attribute '{key}' must be text; got {type(value).__name__}")
    return value


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def _walk(group: h5py.Group, prefix: str = "") -> dict[str, h5py.Dataset]:
    out = {}
    for key, item in group.items():
        name = f"{prefix}{key}"
        if isinstance(item, h5py.Dataset):
            out[name] = item
        elif isinstance(item, h5py.Group):
            out.update(_walk(item, name + "/"))
    return out


def _read_rows(path: Path, name: str, ds: h5py.Dataset, rows: Iterable[int]) -> None:
    for i in rows:
        try:
            ds[i]
        except (OSError, RuntimeError, ValueError) as exc:
            raise _fail(path, f"sample {i} is unreadable ({exc})", f"{SAMPLES}/{name}") from None


def validate_file(path: str | os.PathLike, *, check_data: bool = True, full: bool = False,
                  _expect_plain: bool = False) -> DatasetSummary:
    """Check a contract-4 file (or index) and summarise it.

    Checks: the file opens as HDF5; the root attributes (``format`` equal to
    :data:`FORMAT`, ``created`` ISO time, ``generator`` JSON object, ``model`` text); every
    required dataset exists with its contract shape and dtype, sizes consistent across
    datasets (N, L, H, W, k_*); known extras match when present; other datasets have N
    rows. For an index, every shard it maps exists and is valid itself, and row counts
    agree. With ``check_data`` the first and last sample of every dataset are read (a
    truncated or damaged file fails here); with ``full`` every sample is read.

    Args:
        path: the ``.h5`` file.
        check_data: read the first and last sample of every dataset.
        full: read every sample of every dataset (slow for big files).

    Returns:
        :class:`DatasetSummary`.

    Raises:
        DatasetError: naming the file and, where there is one, the dataset.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            return _validate_open(f, path, check_data=check_data, full=full,
                                  expect_plain=_expect_plain)
        except DatasetError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise _fail(path, f"unreadable HDF5 structure ({exc})") from None


def _validate_open(f: h5py.File, path: Path, *, check_data: bool, full: bool,
                   expect_plain: bool) -> DatasetSummary:
    fmt = _attr_text(f, path, "format")
    if fmt != FORMAT:
        raise _fail(path, f"root attribute 'format' is '{fmt}'; expected '{FORMAT}'")
    created = _attr_text(f, path, "created")
    try:
        datetime.fromisoformat(created)
    except ValueError:
        raise _fail(path, f"root attribute 'created' is not an ISO time: '{created}'") from None
    gen_text = _attr_text(f, path, "generator")
    try:
        generator = json.loads(gen_text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"root attribute 'generator' is not valid JSON ({exc})") from None
    if not isinstance(generator, dict):
        raise _fail(path, "root attribute 'generator' must be a JSON object")
    model = _attr_text(f, path, "model")
    if SAMPLES not in f or not isinstance(f[SAMPLES], h5py.Group):
        raise _fail(path, f"group '{SAMPLES}/' is missing")
    present = _walk(f[SAMPLES])

    for name in REQUIRED:
        if name not in present:
            raise _fail(path, "missing", f"{SAMPLES}/{name}")
    # sizes bound by the required datasets
    img = present["images"]
    if img.ndim != 5 or img.shape[-1] != 3:
        raise _fail(path, f"expected shape (N, L, H, W, 3); got {_fmt(img.shape)}",
                    f"{SAMPLES}/images")
    n, L, H, W = (int(s) for s in img.shape[:4])
    dims: dict[str, int] = {"L": L, "H": H, "W": W}
    for key, name in (("k_id", "params/id"), ("k_exp", "params/exp"),
                      ("k_alb", "params/albedo")):
        ds = present[name]
        if ds.ndim != 2:
            raise _fail(path, f"expected shape (N, {key}); got {_fmt(ds.shape)}",
                        f"{SAMPLES}/{name}")
        dims[key] = int(ds.shape[1])
    if n < 1:
        raise _fail(path, "holds no samples", f"{SAMPLES}/images")

    datasets: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, ds in present.items():
        fld = FIELD_BY_NAME.get(name)
        if fld is not None:
            expect = (n,) + field_shape(fld, dims)
            if ds.shape != expect:
                pattern = ("N",) + fld.shape
                raise _fail(path, f"expected shape {_fmt(pattern)} = {_fmt(expect)}; got "
                            f"{_fmt(ds.shape)}", f"{SAMPLES}/{name}")
            if fld.is_string:
                if h5py.check_string_dtype(ds.dtype) is None:
                    raise _fail(path, f"expected variable-length UTF-8 strings; got {ds.dtype}",
                                f"{SAMPLES}/{name}")
            elif ds.dtype != fld.dtype:
                raise _fail(path, f"expected dtype {fld.dtype}; got {ds.dtype}",
                            f"{SAMPLES}/{name}")
        elif ds.ndim < 1 or ds.shape[0] != n:
            raise _fail(path, f"expected {n} rows (first axis N); got shape {_fmt(ds.shape)}",
                        f"{SAMPLES}/{name}")
        datasets[name] = (tuple(int(s) for s in ds.shape), str(ds.dtype))

    virtual = any(ds.is_virtual for ds in present.values())
    if virtual and expect_plain:
        raise _fail(path, "a shard must not itself be a virtual index")
    shards: list[Path] = []
    if virtual:
        shards = _validate_sources(f, path, present, check_data=check_data, full=full)
    if check_data or full:
        for name, ds in present.items():
            if ds.is_virtual or 0 in ds.shape:
                continue  # shards were read above
            rows = range(n) if full else sorted({0, n - 1})
            _read_rows(path, name, ds, rows)

    attrs = {}
    for key, value in f.attrs.items():
        attrs[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else (
            value.item() if isinstance(value, np.generic) else value)
    size = path.stat().st_size + sum(p.stat().st_size for p in shards)
    return DatasetSummary(
        path=path, n=n, n_lights=L, height=H, width=W, k_id=dims["k_id"],
        k_exp=dims["k_exp"], k_alb=dims["k_alb"], created=created, model=model,
        generator=generator, attrs=attrs, datasets=datasets,
        extras=tuple(k for k in present if k not in REQUIRED), virtual=virtual,
        shards=tuple(shards), file_bytes=size)


def _validate_sources(f: h5py.File, path: Path, present: dict[str, h5py.Dataset], *,
                      check_data: bool, full: bool) -> list[Path]:
    """Check the shard files of a virtual index; return them in row order."""
    folder = path.parent
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for name, ds in present.items():
        if not ds.is_virtual:
            if 0 not in ds.shape:
                raise _fail(path, "an index must map every dataset onto its shards",
                            f"{SAMPLES}/{name}")
            continue
        maps = []
        for vmap in ds.virtual_sources():
            start, stop = vmap.vspace.get_select_bounds()
            maps.append((int(start[0]), int(stop[0]) + 1, vmap.file_name))
            if vmap.dset_name.lstrip("/") != f"{SAMPLES}/{name}":
                raise _fail(path, f"maps onto '{vmap.dset_name}' of {vmap.file_name}",
                            f"{SAMPLES}/{name}")
        maps.sort()
        covered = 0
        for start, stop, _ in maps:
            if start != covered:
                raise _fail(path, f"rows {covered}..{start - 1} are not mapped onto any shard",
                            f"{SAMPLES}/{name}")
            covered = stop
        if covered != ds.shape[0]:
            raise _fail(path, f"rows {covered}..{ds.shape[0] - 1} are not mapped onto any "
                        f"shard", f"{SAMPLES}/{name}")
        ranges[name] = maps
    reference = ranges.get("images")
    for name, maps in ranges.items():
        if maps != reference:
            raise _fail(path, "maps rows onto shards differently from 'images'",
                        f"{SAMPLES}/{name}")
    shards = []
    for start, stop, fname in reference or []:
        src = Path(fname) if os.path.isabs(fname) else folder / fname
        if not src.is_file():
            raise _fail(path, f"shard file {src} (rows {start}..{stop - 1}) is missing",
                        f"{SAMPLES}/images")
        try:
            sub = validate_file(src, check_data=check_data, full=full, _expect_plain=True)
        except DatasetError as exc:
            raise _fail(path, f"shard rows {start}..{stop - 1} are invalid: {exc}") from None
        if sub.n != stop - start:
            raise _fail(path, f"shard {src.name} holds {sub.n} samples; the index maps "
                        f"{stop - start}", f"{SAMPLES}/images")
        for name, (shape, dtype) in sub.datasets.items():
            if name in present and present[name].is_virtual:
                if shape[1:] != present[name].shape[1:] or dtype != str(present[name].dtype):
                    raise _fail(path, f"shard {src.name} has shape {_fmt(shape)} {dtype}; "
                                f"the index expects rows of {_fmt(present[name].shape[1:])} "
                                f"{present[name].dtype}", f"{SAMPLES}/{name}")
        for name in present:
            if present[name].is_virtual and name not in sub.datasets:
                raise _fail(path, f"shard {src.name} lacks this dataset", f"{SAMPLES}/{name}")
        shards.append(src)
    return shards


# ------------------------------------------------------------------ reading
def read_sample(f: h5py.File | str | os.PathLike, i: int) -> dict[str, Any]:
    """Every dataset of sample ``i`` as numpy arrays (strings as ``str``).

    Args:
        f: an open file or a path (opened read-only for this call).
        i: sample index in [0, N).

    Returns:
        dict from dataset name under ``samples/`` (e.g. ``images``, ``params/pose``) to the
        row: e.g. ``images`` (L, H, W, 3) float16, ``subject`` str.

    Raises:
        DatasetError: for an index out of range or an unreadable row.
    """
    if not isinstance(f, h5py.File):
        path = Path(f)
        with _open(path) as opened:
            return read_sample(opened, i)
    path = Path(f.filename)
    if SAMPLES not in f:
        raise _fail(path, f"group '{SAMPLES}/' is missing")
    out: dict[str, Any] = {}
    for name, ds in _walk(f[SAMPLES]).items():
        if not -ds.shape[0] <= i < ds.shape[0]:
            raise _fail(path, f"sample {i} is out of range [0, {ds.shape[0]})",
                        f"{SAMPLES}/{name}")
        try:
            if h5py.check_string_dtype(ds.dtype) is not None:
                out[name] = ds.asstr()[i]
            else:
                out[name] = ds[i]
        except (OSError, RuntimeError, ValueError) as exc:
            raise _fail(path, f"sample {i} is unreadable ({exc})", f"{SAMPLES}/{name}") from None
    return out
