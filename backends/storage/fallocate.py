"""fallocate(2) hole punching through ctypes: `os.posix_fallocate` can only allocate.

Linux discards on file-backed disks the way the loop driver does: FALLOC_FL_PUNCH_HOLE |
FALLOC_FL_KEEP_SIZE frees whole filesystem blocks in the range and zeroes partial ones, so the
range reads back as zeroes and the image size never changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01  # <linux/falloc.h>
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate `length` bytes at `offset` of `fd`, keeping the file size. OSError on failure
    (EOPNOTSUPP when the filesystem cannot punch holes)."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
