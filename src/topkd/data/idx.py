"""Reader for the IDX format of (Fashion-)MNIST (http://yann.lecun.com/exdb/mnist/).

Header: 4-byte big-endian magic ``0x0000TTDD`` (TT = element type, DD = number of dimensions),
then DD big-endian uint32 sizes, then the data in C order. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_MAGIC = 2051  # uint8, 3 dims
LABELS_MAGIC = 2049  # uint8, 1 dim


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw, detected from the content) into a writable array."""
    path = Path(path)
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            buf = gzip.decompress(buf)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(buf) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(buf)} bytes)")
    magic = int.from_bytes(buf[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
    if buf[0] or buf[1] or buf[2] not in _DTYPES:
        raise ValueError(f"{path}: bad IDX magic number {magic:#010x}")
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[buf[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(buf) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says {dims} x {dtype.itemsize} bytes, file has "
            f"{len(buf) - header} data bytes (truncated or corrupt)"
        )
    # bytearray -> writable array (torch.from_numpy warns on read-only buffers).
    arr = np.frombuffer(bytearray(buf[header:]), dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)
