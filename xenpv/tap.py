"""A Linux TAP device with virtio-net headers: how real network stacks meet the PV path.

`Tap.open()` opens /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, sets the header size
(TUNSETVNETHDRSZ: 10 for `struct virtio_net_hdr`, 12 for `virtio_net_hdr_mrg_rxbuf`) and tells
the kernel which offloads we take (TUNSETOFFLOAD). By default that is what Linux netfront
can carry over netif: partial checksums (TUN_F_CSUM, netif's csum_blank / data_validated)
and TCP segmentation offload for IPv4 and IPv6 (TUN_F_TSO4/6, netif's GSO extra-info types
TCPV4/TCPV6). netif has no UDP GSO and no ECN flag, so neither UFO nor TSO_ECN is offered and
the kernel segments those itself before they reach us. Frames we write may carry GSO and
partial-checksum metadata whatever we offered: the kernel always accepts them.

Every frame read or written is preceded by the virtio-net header (`VirtioNetHdr`, in
`xenpv.abi.virtio_net`). I/O is non-blocking: trio waits for readability / writability on the
descriptor. Both drivers use it: netback plugs a TAP into its switch (`backends.tap`),
netfront attaches one to a guest interface (`frontends.netfront.tap`).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import struct
from types import TracebackType

import structlog
import trio

from xenpv.abi.virtio_net import VNET_HDR_SIZES, VirtioNetHdr
from xenpv.errors import XenpvError

log = structlog.get_logger()

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux _IOC() for the 'T' (tun) ioctl group."""
    return (direction << 30) | (size << 16) | (ord("T") << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
TUNSETIFF = _ioc(_IOC_WRITE, 202, 4)
TUNGETFEATURES = _ioc(_IOC_READ, 207, 4)
TUNSETOFFLOAD = _ioc(_IOC_WRITE, 208, 4)
TUNGETIFF = _ioc(_IOC_READ, 210, 4)
TUNGETVNETHDRSZ = _ioc(_IOC_READ, 215, 4)
TUNSETVNETHDRSZ = _ioc(_IOC_WRITE, 216, 4)

IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class TunOffload(enum.IntFlag):
    """TUNSETOFFLOAD bits (<linux/if_tun.h>): what the kernel may hand us unfinished."""

    TUN_F_CSUM = 0x01
    TUN_F_TSO4 = 0x02
    TUN_F_TSO6 = 0x04
    TUN_F_TSO_ECN = 0x08
    TUN_F_UFO = 0x10


NETIF_OFFLOADS = TunOffload.TUN_F_CSUM | TunOffload.TUN_F_TSO4 | TunOffload.TUN_F_TSO6


MAX_FRAME = 0x40000  # read buffer: a 64 KiB GSO frame plus headers, with room to spare


class TapError(XenpvError):
    """The TAP device could not be created, configured or used."""


class Tap:
    """An open TAP device. Use `Tap.open()`; close with `close()` or `async with`."""

    def __init__(self, fd: int, name: str, vnet_hdr_size: int) -> None:
        self._fd = fd
        self.name = name
        self.vnet_hdr_size = vnet_hdr_size
        self._buf = bytearray(MAX_FRAME)
        self._view = memoryview(self._buf)
        self._closed = False

    @classmethod
    def open(
        cls,
        name: str = "xenpv%d",
        *,
        vnet_hdr_size: int = 10,
        offloads: int = NETIF_OFFLOADS,
        multi_queue: bool = False,
    ) -> Tap:
        """Create (or attach to) the TAP device `name` ("%d" picks the next free number)."""
        if vnet_hdr_size not in VNET_HDR_SIZES:
            raise TapError(f"virtio-net header size must be 10 or 12, not {vnet_hdr_size}")
        raw_name = name.encode()
        if not raw_name or len(raw_name) >= IFNAMSIZ or b"/" in raw_name or b" " in raw_name:
            raise TapError(f"bad interface name {name!r} (1 to {IFNAMSIZ - 1} bytes)")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw_name, flags))
            actual = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", vnet_hdr_size))
            fcntl.ioctl(fd, TUNSETOFFLOAD, int(offloads))
        except OSError as exc:
            os.close(fd)
            hint = " (needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
            raise TapError(f"cannot set up TAP {name!r}: {exc.strerror}{hint}") from None
        log.info("tap.open", tap=actual, vnet_hdr_size=vnet_hdr_size, offloads=int(offloads))
        return cls(fd, actual, vnet_hdr_size)

    def fileno(self) -> int:
        return self._fd

    def read_nowait(self) -> tuple[VirtioNetHdr, memoryview] | None:
        """The next frame if the kernel has one queued, else None (never blocks).

        The frame is a view into this TAP's read buffer, valid only until the next read:
        copy it (or finish with it) first. Batch readers loop on this until None, then
        `await wait_readable()`, so a burst the kernel queued costs one wake-up, not one each.
        """
        size = self.vnet_hdr_size
        while True:
            self._check_open()
            try:
                n = os.readv(self._fd, [self._view])
            except BlockingIOError:
                return None
            except OSError as exc:
                raise TapError(f"read from TAP {self.name}: {exc.strerror}") from None
            if n < size:  # cannot happen with IFF_VNET_HDR; never trust it blindly
                log.warning("tap.short_read", tap=self.name, length=n)
                continue
            return VirtioNetHdr.unpack(self._view, size), self._view[size:n]

    async def wait_readable(self) -> None:
        """Wait until a frame can be read (or the TAP is closed: the next read says so)."""
        self._check_open()
        await trio.lowlevel.wait_readable(self._fd)

    def write_nowait(self, hdr: VirtioNetHdr, frame: bytes | bytearray | memoryview) -> bool:
        """Hand a frame to the kernel if it takes it now; False if the write would block."""
        self._check_open()
        try:
            os.writev(self._fd, [hdr.pack(self.vnet_hdr_size), frame])
        except BlockingIOError:
            return False
        except OSError as exc:
            # EINVAL: the kernel refused the header (bad GSO or checksum offsets) or the
            # frame; EIO: the interface is down. The device stays usable.
            raise TapError(f"write to TAP {self.name}: {exc.strerror}") from None
        return True

    async def wait_writable(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self._fd)

    async def read_frame(self) -> tuple[VirtioNetHdr, bytes]:
        """The next frame the kernel sends out of the TAP, with its virtio-net header."""
        while True:
            got = self.read_nowait()
            if got is None:
                await self.wait_readable()
                continue
            hdr, frame = got[0], bytes(got[1])  # copied before another task can read
            await trio.lowlevel.cancel_shielded_checkpoint()
            return hdr, frame

    async def write_frame(self, hdr: VirtioNetHdr, frame: bytes | bytearray | memoryview) -> None:
        """Hand a frame (with its GSO / checksum metadata) to the kernel's network stack."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.write_nowait(hdr, frame):
            await self.wait_writable()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake tasks waiting on the descriptor (outside trio nobody can be waiting).
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._fd)
        os.close(self._fd)
        log.info("tap.close", tap=self.name)

    async def __aenter__(self) -> Tap:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TapError(f"TAP {self.name} is closed")
