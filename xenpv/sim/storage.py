"""Image disks in a simulated run: kept in memory for the whole run, like files on a disk.

A raw image does its I/O in worker threads, which a simulated run cannot have, and a plain
memory disk starts empty each time it is opened; a detach and re-attach or a backend restart
must find what was written before. So the sim keeps one buffer per image path and every open
of that path serves the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from backends.blkback import device as blkback_device
from backends.blkback.keys import BackendConfig
from backends.storage.memory import MemoryDisk
from xenpv.errors import XenpvError


class _ImageInMemory(MemoryDisk):
    def __init__(self, data: bytearray, config: BackendConfig) -> None:
        super().__init__(len(data), sector_size=config.sector_size, read_only=config.read_only)
        self._data = data  # shared by every open of the image: what was written survives


class SimImages:
    def __init__(self) -> None:
        self._images: dict[str, bytearray] = {}

    def open(self, config: BackendConfig) -> MemoryDisk:
        data = self._images.get(config.path)
        if data is None:
            if config.size is None:
                raise XenpvError(f"sim: image {config.path!r} has no size to create it with")
            data = self._images[config.path] = bytearray(config.size)
        return _ImageInMemory(data, config)


@contextmanager
def images_in_memory() -> Iterator[SimImages]:
    images = SimImages()
    saved = blkback_device.image_opener
    blkback_device.image_opener = images.open
    try:
        yield images
    finally:
        blkback_device.image_opener = saved
