"""Structural check of a MATLAB v5 ``.mat`` file before ``scipy.io.loadmat`` reads it.

Why: scipy's compiled MAT v5 reader trusts the element tags it reads. A corrupt file can make it raise
almost anything (``IndexError``, ``TypeError``, ``ValueError``, ``OSError``) and some corruptions crash
the interpreter (a data element of type 0 inside an array indexes an empty slot of scipy's dtype table:
segmentation fault, scipy 1.17). Python cannot catch a crash, so :func:`check_mat5` walks the file's
element tree first, in pure Python, and raises :class:`~brainenc.exceptions.DataFormatError` naming the
file and the byte offset of the first bad element.

What is checked (the MAT-File Format reference, "Level 5 MAT-File Format"; scipy's ``_mio5.py``):

- the 128-byte header: version 0x0100 (0x0200 is v7.3/HDF5, which loadmat cannot read; a zero byte in
  the first four bytes marks a v4 file) and the ``IM``/``MI`` endian indicator;
- every top-level element: an ``miMATRIX`` (14) or ``miCOMPRESSED`` (15) tag whose byte count fits in the
  file; compressed elements must inflate to one complete ``miMATRIX``;
- every variable's header as scipy reads it (16 bytes of array flags, dimensions ``miINT32``, name
  ``miINT8``/``miUTF8``), including variables loadmat is told to skip;
- for the variables that will be read (``deep``): a numeric class (mxDOUBLE .. mxUINT64) whose real (and
  imaginary) data element has a numeric type and exactly ``prod(dims) * itemsize`` bytes.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from brainenc.exceptions import DataFormatError

__all__ = ["check_mat5", "MAX_MAT_BYTES"]

MI_INT8, MI_INT32, MI_MATRIX, MI_COMPRESSED, MI_UTF8 = 1, 5, 14, 15, 16
#: numeric data types and their item sizes (miINT8 .. miUINT64; 8, 10 and 11 are reserved)
NUMERIC_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS
MX_OPAQUE = 17
MAX_DIMS = 32
#: largest file / inflated variable accepted (the NSD design is ~1-3 MB)
MAX_MAT_BYTES = 1 << 30


class _Bad(Exception):
    """Internal: a structural problem at a byte offset (turned into DataFormatError by check_mat5)."""


class _Buf:
    def __init__(self, data: bytes, endian: str, where: str):
        self.data, self.e, self.where = data, endian, where

    def u32x2(self, pos: int, end: int) -> tuple[int, int]:
        if pos + 8 > end:
            raise _Bad(f"{self.where} byte {pos}: element tag cut off ({end - pos} bytes left, need 8)")
        return struct.unpack_from(self.e + "II", self.data, pos)

    def element(self, pos: int, end: int) -> tuple[int, int, int, int]:
        """``(type, nbytes, data_start, next_pos)`` of the element at ``pos`` (full or small format)."""
        a, b = self.u32x2(pos, end)
        if a >> 16:  # small data element: type in the low 16 bits, 1..4 bytes of data in the tag
            n = a >> 16
            if n > 4:
                raise _Bad(f"{self.where} byte {pos}: small data element claims {n} bytes (at most 4)")
            return a & 0xFFFF, n, pos + 4, pos + 8
        start = pos + 8
        if start + b > end:
            raise _Bad(f"{self.where} byte {pos}: element of type {a} claims {b} bytes; only {end - start} remain")
        nxt = start + b + ((8 - b % 8) % 8)
        return a, b, start, min(nxt, end)


def _matrix(buf: _Buf, pos: int, end: int, deep: set[str]) -> str | None:
    """Check the miMATRIX body in ``buf.data[pos:end]``; return the variable name (None: opaque class)."""
    # the array-flags tag (miUINT32, 8 bytes in MATLAB's files) is skipped unread by scipy: not judged here
    if pos + 16 > end:
        raise _Bad(f"{buf.where} byte {pos}: array flags cut off ({end - pos} bytes left, need 16)")
    flags, _nzmax = struct.unpack_from(buf.e + "II", buf.data, pos + 8)
    mclass, complex_ = flags & 0xFF, bool(flags & 0x800)
    pos += 16
    if mclass == MX_OPAQUE:  # no dimensions or name (scipy names it 'None'); never one we read
        return None
    t, n, s, pos = buf.element(pos, end)
    if t != MI_INT32 or n % 4:
        raise _Bad(f"{buf.where} byte {s - 8}: dimensions must be miINT32; found type {t}, {n} bytes")
    dims = struct.unpack_from(f"{buf.e}{n // 4}i", buf.data, s)
    if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
        raise _Bad(f"{buf.where} byte {s - 8}: invalid dimensions {dims[:8]}")
    t, n, s, pos = buf.element(pos, end)
    if t not in (MI_INT8, MI_UTF8):
        raise _Bad(f"{buf.where} byte {s - 8}: variable name must be miINT8; found type {t}")
    name = bytes(buf.data[s:s + n]).rstrip(b"\x00").decode("latin1")
    if name not in deep:
        return name
    if mclass not in NUMERIC_CLASSES:
        raise _Bad(f"{buf.where}: variable '{name}' must be a numeric array; found MATLAB class {mclass}")
    count = 1
    for d in dims:
        count *= d
    for part in ("real", "imaginary") if complex_ else ("real",):
        t, n, s, pos = buf.element(pos, end)
        if t not in NUMERIC_ITEMSIZE:
            raise _Bad(f"{buf.where} byte {s - 8}: {part} data of '{name}' has type {t}, not a numeric type")
        if n != count * NUMERIC_ITEMSIZE[t]:
            raise _Bad(f"{buf.where} byte {s - 8}: {part} data of '{name}' has {n} bytes; dimensions "
                       f"{tuple(dims)} need {count * NUMERIC_ITEMSIZE[t]}")
    return name


def check_mat5(path: str | Path, deep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Validate the structure of MAT v5 file ``path``; deep-check the variables named in ``deep``.

    Parameters
    ----------
    path : str or Path
    deep : set of str
        Variables that will be read: each must be a complete numeric array.

    Returns
    -------
    list of str
        Variable names in file order.

    Raises
    ------
    DataFormatError
        ``<path>: not a readable MATLAB v5 .mat file (<what, at which byte>)``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_MAT_BYTES:
            raise _Bad(f"{size} bytes is more than the {MAX_MAT_BYTES} accepted")
        data = p.read_bytes()
        if len(data) >= 4 and 0 in data[:4]:  # scipy's own test: v4 files start with a zero byte
            raise _Bad("a MATLAB v4 file (or not a .mat file); save it as v5/v7 (MATLAB: save -v7)")
        if len(data) < 128:
            raise _Bad(f"{len(data)} bytes; a MAT v5 file starts with a 128-byte header")
        indicator = data[126:128]
        if indicator not in (b"IM", b"MI"):
            raise _Bad(f"header bytes 126-127 must be 'IM' or 'MI'; found {indicator!r}")
        e = "<" if indicator == b"IM" else ">"
        version = struct.unpack_from(e + "H", data, 124)[0]
        if version == 0x0200:
            raise _Bad("a v7.3 (HDF5) .mat file, which scipy cannot read; save it as v7 (MATLAB: save -v7)")
        if version != 0x0100:
            raise _Bad(f"unknown MAT version 0x{version:04x} (v5 is 0x0100)")
        top = _Buf(data, e, "")
        pos, names = 128, []
        while pos < len(data):
            t, n = top.u32x2(pos, len(data))
            if t >> 16 or t not in (MI_MATRIX, MI_COMPRESSED) or n == 0:
                raise _Bad(f"byte {pos}: top-level element has type {t & 0xFFFF if t >> 16 else t} "
                           f"and {n} bytes; expected a non-empty miMATRIX (14) or miCOMPRESSED (15)")
            start, stop = pos + 8, pos + 8 + n
            if stop > len(data):
                raise _Bad(f"byte {pos}: element claims {n} bytes; only {len(data) - start} remain (truncated file)")
            if t == MI_COMPRESSED:
                dec = zlib.decompressobj()
                try:
                    inner = dec.decompress(data[start:stop], MAX_MAT_BYTES)
                except zlib.error as exc:
                    raise _Bad(f"byte {pos}: corrupt compressed element ({exc})") from None
                if dec.unconsumed_tail:
                    raise _Bad(f"byte {pos}: compressed element inflates to more than {MAX_MAT_BYTES} bytes")
                ib = _Buf(inner, e, f"compressed element at byte {pos}:")
                it, il = ib.u32x2(0, len(inner))
                if it != MI_MATRIX:
                    raise _Bad(f"compressed element at byte {pos}: holds type {it}; expected miMATRIX (14)")
                if 8 + il > len(inner):
                    raise _Bad(f"compressed element at byte {pos}: inflates to {len(inner) - 8} bytes of a "
                               f"{il}-byte array (truncated or corrupt)")
                if il == 0:
                    raise _Bad(f"compressed element at byte {pos}: holds an empty miMATRIX")
                name = _matrix(ib, 8, 8 + il, set(deep))
            else:
                name = _matrix(top, start, stop, set(deep))
            names.append("None" if name is None else name)
            pos = stop
    except _Bad as exc:
        raise DataFormatError(f"{p}: not a readable MATLAB v5 .mat file ({str(exc).strip()})") from None
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read the file ({exc.strerror or exc})") from None
    return names
