"""Reader for the IDX file format used by MNIST and Fashion-MNIST (gzipped or raw)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        if head == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
            with gzip.open(fh) as gz:
                return gz.read()
        return fh.read()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``.gz`` or uncompressed) into an array of shape ``dims``.

    The header is ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian uint32 sizes.
    Returns an array in native byte order (uint8 for image/label files).
    """
    try:
        data = _read_bytes(path)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"could not read IDX file {os.fspath(path)!r}: {exc}") from exc
    if len(data) < 4:
        raise ValueError(
            f"{os.fspath(path)!r} is not an IDX file: only {len(data)} bytes "
            "(the header needs at least 4); re-download or reinstall the dataset"
        )
    zero0, zero1, type_code, ndim = struct.unpack(">BBBB", data[:4])
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{os.fspath(path)!r} has a bad IDX magic number 0x{data[:4].hex()}: expected "
            "0x0000TTDD with type TT in "
            f"{[hex(t) for t in _IDX_DTYPES]} and DD the number of dimensions"
        )
    if ndim == 0:
        raise ValueError(f"{os.fspath(path)!r}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{os.fspath(path)!r} is truncated: header declares {ndim} dimensions "
            f"({header_len} bytes) but the file has {len(data)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        raise ValueError(
            f"{os.fspath(path)!r}: dims {tuple(dims)} of {dtype} need {expected} data bytes "
            f"but the file holds {payload}; the file is truncated or corrupt"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(dims)), offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``); used by tests."""
    arr = np.asarray(array)
    code = next(
        (
            c
            for c, dt in _IDX_DTYPES.items()
            if dt.kind == arr.dtype.kind and dt.itemsize == arr.dtype.itemsize
        ),
        None,
    )
    if code is None or arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(
            f"cannot write array of dtype {arr.dtype} and ndim {arr.ndim} as IDX; use one of "
            f"{[str(d) for d in _IDX_DTYPES.values()]} with 1..255 dimensions"
        )
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = arr.astype(_IDX_DTYPES[code], copy=False).tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + body)
