"""A Linux TAP device on a netfront: real network stacks over the PV path.

The guest side of `--tap NAME` (the `xenpv-tap` frontend key): frames the kernel sends out
of the TAP go to `Netfront.send`, frames netfront receives go to the kernel. Offloads are
carried through both ways, as Linux netfront maps its skb state onto netif:

    virtio-net header (TAP)                       netif
    VIRTIO_NET_HDR_F_NEEDS_CSUM        <->  NETTXF_csum_blank (+data_validated) / NETRXF_csum_blank
    VIRTIO_NET_HDR_F_DATA_VALID        <->  NETTXF_data_validated / NETRXF_data_validated
    VIRTIO_NET_HDR_GSO_TCPV4/6 + size  <->  GSO extra-info, XEN_NETIF_GSO_TYPE_TCPV4/6 + size

On receive, `csum_start`, `csum_offset` and `hdr_len` are recomputed from the frame's
headers (netif does not carry them: Linux netfront runs `skb_checksum_setup`); a partial-
checksum frame whose headers cannot be parsed is dropped, as netfront drops it.

The TAP offers the kernel only what the backend negotiated (TUNSETOFFLOAD after each
connection), and its `gso_max_size` is lowered to what netif can carry
(XEN_NETIF_MAX_TX_SIZE minus header room, Linux netfront's `netif_set_tso_max_size`), so a
TSO frame always fits one netif packet: that is how the PV path reaches multi-gigabit rates.
"""

from __future__ import annotations

import fcntl
from contextlib import suppress

import structlog
import trio

from frontends.netfront.core import NetfrontError, RxFrame
from frontends.netfront.device import Netfront
from xenpv.abi.netif import (
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_MAX_TX_SIZE,
    NetifGsoExtra,
)
from xenpv.abi.virtio_net import VirtioNetHdr, VirtioNetHdrFlags, VirtioNetHdrGso
from xenpv.ethernet import parse
from xenpv.tap import TUNSETOFFLOAD, Tap, TapError, TunOffload

log = structlog.get_logger()

MAX_TCP_HEADER = 320  # Linux: L1_CACHE_ALIGN(128 + MAX_HEADER) on x86-64
TAP_GSO_MAX_SIZE = XEN_NETIF_MAX_TX_SIZE - MAX_TCP_HEADER
# Frames read from the TAP and put on the ring before one push: a burst the kernel queued
# costs one notification, yet the backend starts on a long burst early. Measured with iperf3
# (interleaved runs): 4 beats 2 (more notifications) and 8 or 16 (backend and guest process
# overlap less, so the pipeline runs in turns).
TAP_TX_BURST = 4
NEEDS_CSUM = int(VirtioNetHdrFlags.VIRTIO_NET_HDR_F_NEEDS_CSUM)  # ints: IntFlag ops are slow
DATA_VALID = int(VirtioNetHdrFlags.VIRTIO_NET_HDR_F_DATA_VALID)
_TO_NETIF_GSO: dict[int, int] = {
    VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4: XEN_NETIF_GSO_TYPE_TCPV4,
    VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV6: XEN_NETIF_GSO_TYPE_TCPV6,
}
_TO_VIRTIO_GSO: dict[int, int] = {v: k for k, v in _TO_NETIF_GSO.items()}


class OffloadError(NetfrontError):
    """A frame's offload state cannot cross (unparsable headers, unsupported GSO type)."""


def to_netif(hdr: VirtioNetHdr) -> tuple[NetifGsoExtra | None, bool, bool]:
    """(gso, csum_blank, data_validated) for a frame the kernel wrote to the TAP."""
    gso = None
    kind = hdr.gso
    if kind != VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_NONE:
        netif_type = _TO_NETIF_GSO.get(kind)
        if netif_type is None or not hdr.gso_size:
            raise OffloadError(
                f"virtio GSO type {hdr.gso_type} size {hdr.gso_size} has no netif form"
            )
        gso = NetifGsoExtra(hdr.gso_size, netif_type)
    return gso, hdr.needs_csum, hdr.data_valid


def to_virtio(rx: RxFrame) -> VirtioNetHdr:
    """The virtio-net header that hands a received frame's offload state to the kernel."""
    if not rx.csum_blank and rx.gso is None:
        return VirtioNetHdr(flags=DATA_VALID if rx.data_validated else 0)
    headers = parse(rx.frame)
    if headers is None or not headers.csum_offset:
        raise OffloadError("partial checksum or GSO on a frame without a TCP/UDP header")
    flags = NEEDS_CSUM if rx.csum_blank else (DATA_VALID if rx.data_validated else 0)
    gso_type: int = VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_NONE
    gso_size = hdr_len = 0
    if rx.gso is not None:
        gso_type = _TO_VIRTIO_GSO[rx.gso.gso_type]
        gso_size = rx.gso.size
        hdr_len = headers.header_len
    return VirtioNetHdr(
        flags=flags,
        gso_type=gso_type,
        hdr_len=hdr_len,
        gso_size=gso_size,
        csum_start=headers.l4_offset if rx.csum_blank else 0,
        csum_offset=headers.csum_offset if rx.csum_blank else 0,
    )


def open_tap(name: str) -> Tap:
    """Open the TAP (before any connection: no offloads until the backend's are known)."""
    return Tap.open(name, offloads=0)


async def configure_link(tap: Tap, mac: str | None) -> None:
    """Best effort, before the TAP moves anywhere: give it the vif's MAC (the guest's NIC
    address, as Linux netfront's eth0 has) and a `gso_max_size` netif can carry."""
    command = ["ip", "link", "set", "dev", tap.name, "gso_max_size", str(TAP_GSO_MAX_SIZE)]
    if mac:
        command += ["address", mac]
    try:
        result = await trio.run_process(
            command, check=False, capture_stdout=True, capture_stderr=True
        )
    except OSError as exc:
        log.warning("netfront.tap_configure_failed", tap=tap.name, error=str(exc))
        return
    if result.returncode:
        log.warning(
            "netfront.tap_configure_failed", tap=tap.name, error=result.stderr.decode().strip()
        )


def set_offloads(tap: Tap, front: Netfront) -> int:
    """TUNSETOFFLOAD to what the current connection carries; returns the flags set."""
    info = front.info
    offloads = TunOffload.TUN_F_CSUM
    if info.sg:
        if info.gso_tcpv4:
            offloads |= TunOffload.TUN_F_TSO4
        if info.gso_tcpv6:
            offloads |= TunOffload.TUN_F_TSO6
    try:
        fcntl.ioctl(tap.fileno(), TUNSETOFFLOAD, int(offloads))
    except OSError as exc:
        raise TapError(f"cannot set offloads on TAP {tap.name}: {exc.strerror}") from None
    return int(offloads)


async def run_tap(front: Netfront, tap: Tap) -> None:
    """Pump frames between `tap` and `front` until cancelled (the TAP stays open)."""
    dropped = 0

    async def offloads() -> None:
        generation = None
        with suppress(NetfrontError):  # closed
            while True:
                await front.wait_connected()
                if front.info.generation != generation:
                    generation = front.info.generation
                    try:
                        flags = set_offloads(tap, front)
                    except TapError as exc:  # the kernel then segments and checksums itself
                        log.warning("netfront.tap_offloads_failed", tap=tap.name, error=str(exc))
                    else:
                        log.info("netfront.tap_offloads", tap=tap.name, offloads=flags)
                await front.wait_disconnected()

    async def kernel_to_front() -> None:
        # Every frame the kernel has queued is put on the ring before one push (send's
        # `more`), so a TCP burst costs the backend one wake-up, not one per frame.
        nonlocal dropped
        burst = 0
        while not front.closed:
            try:
                got = None if burst >= TAP_TX_BURST else tap.read_nowait()
                if got is None:
                    front.flush()
                    if burst < TAP_TX_BURST:
                        await tap.wait_readable()
                    burst = 0
                    continue
            except TapError as exc:  # the device went away: the vif itself keeps running
                log.error("netfront.tap_gone", tap=tap.name, error=str(exc))
                nursery.cancel_scope.cancel()
                return
            burst += 1
            hdr, frame = got
            try:
                gso, csum_blank, data_validated = to_netif(hdr)
                # send() copies the frame out of the TAP's read buffer before returning.
                await front.send(
                    frame,
                    gso=gso,
                    csum_blank=csum_blank,
                    data_validated=data_validated,
                    more=True,
                )
            except NetfrontError as exc:
                dropped += 1
                log.warning("netfront.tap_tx_drop", tap=tap.name, length=len(frame), error=str(exc))

    def to_kernel(rx: RxFrame) -> bool:
        """Write one received frame to the TAP; False if the kernel cannot take it now."""
        nonlocal dropped
        try:
            return tap.write_nowait(to_virtio(rx), rx.frame)
        except (OffloadError, TapError) as exc:
            dropped += 1
            log.warning("netfront.tap_rx_drop", tap=tap.name, length=len(rx.frame), error=str(exc))
            return True

    async def front_to_kernel() -> None:
        # Frames already received are written back to back, without a task switch each.
        while True:
            try:
                rx = await front.receive()
                while True:
                    while not to_kernel(rx):
                        await tap.wait_writable()
                    rx = front.receive_nowait()
            except trio.WouldBlock:
                continue
            except NetfrontError:
                return  # netfront closed
            except TapError as exc:  # closed under us
                log.error("netfront.tap_gone", tap=tap.name, error=str(exc))
                return

    front.set_rx_sink(to_kernel)  # frames go to the kernel from netfront's rx task
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(offloads)
            nursery.start_soon(kernel_to_front)
            nursery.start_soon(front_to_kernel)  # what the sink could not take at once
    finally:
        front.set_rx_sink(None)
