"""`struct virtio_net_hdr` (<linux/virtio_net.h>): the offload metadata of a TAP frame.

Every frame read from or written to a TAP opened with IFF_VNET_HDR is preceded by this
header: 10 bytes, or 12 with `num_buffers` (`virtio_net_hdr_mrg_rxbuf`). Its 16-bit fields use
the host's byte order, as the TAP driver's legacy (default) setting does. Both netback (its
host-side ports) and netfront (`--tap`) translate it to and from netif's flags and GSO extras.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from xenpv.abi.errors import VirtioNetError


class VirtioNetHdrFlags(enum.IntFlag):
    """VIRTIO_NET_HDR_F_*."""

    VIRTIO_NET_HDR_F_NEEDS_CSUM = 1  # checksum from csum_start, stored at +csum_offset
    VIRTIO_NET_HDR_F_DATA_VALID = 2  # checksum already verified
    VIRTIO_NET_HDR_F_RSC_INFO = 4


class VirtioNetHdrGso(enum.IntEnum):
    """VIRTIO_NET_HDR_GSO_*."""

    VIRTIO_NET_HDR_GSO_NONE = 0
    VIRTIO_NET_HDR_GSO_TCPV4 = 1
    VIRTIO_NET_HDR_GSO_UDP = 3
    VIRTIO_NET_HDR_GSO_TCPV6 = 4


VIRTIO_NET_HDR_GSO_ECN = 0x80  # or-ed into gso_type
# Plain ints for the per-frame tests: IntFlag `&` costs about a microsecond.
_NEEDS_CSUM = int(VirtioNetHdrFlags.VIRTIO_NET_HDR_F_NEEDS_CSUM)
_DATA_VALID = int(VirtioNetHdrFlags.VIRTIO_NET_HDR_F_DATA_VALID)
VNET_HDR_SIZES = (10, 12)
_HDR = struct.Struct("=BBHHHH")  # struct virtio_net_hdr, host order (legacy TAP)
_NUM_BUFFERS = struct.Struct("=H")


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    """`struct virtio_net_hdr` (10 bytes), plus `num_buffers` in the 12-byte form."""

    flags: int = 0
    gso_type: int = VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0  # Ethernet + IP + TCP/UDP header bytes (GSO)
    gso_size: int = 0  # payload bytes per segment (the MSS)
    csum_start: int = 0  # where checksumming starts (NEEDS_CSUM)
    csum_offset: int = 0  # where, after csum_start, the checksum goes
    num_buffers: int = 0  # 12-byte header only; 0 or 1 on a TAP

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & _NEEDS_CSUM)

    @property
    def data_valid(self) -> bool:
        return bool(self.flags & _DATA_VALID)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    def pack(self, size: int = 10) -> bytes:
        head = _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )
        if size == 10:
            return head
        if size == 12:
            return head + _NUM_BUFFERS.pack(self.num_buffers)
        raise VirtioNetError(f"virtio-net header size must be 10 or 12, not {size}")

    @classmethod
    def unpack(cls, data: bytes | memoryview, size: int = 10) -> VirtioNetHdr:
        if size not in VNET_HDR_SIZES:
            raise VirtioNetError(f"virtio-net header size must be 10 or 12, not {size}")
        if len(data) < size:
            raise VirtioNetError(f"virtio-net header needs {size} bytes, got {len(data)}")
        num_buffers = _NUM_BUFFERS.unpack_from(data, 10)[0] if size == 12 else 0
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(data, 0)
        return cls(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


NO_OFFLOAD = VirtioNetHdr()
