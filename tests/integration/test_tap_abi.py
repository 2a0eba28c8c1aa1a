"""The TAP ABI: virtio-net header codec and ioctl numbers, checked against the C headers."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv import tap
from xenpv.abi import virtio_net
from xenpv.abi.errors import VirtioNetError
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.tap import TapError

u16 = st.integers(0, 0xFFFF)
headers = st.builds(
    VirtioNetHdr,
    flags=st.integers(0, 0xFF),
    gso_type=st.integers(0, 0xFF),
    hdr_len=u16,
    gso_size=u16,
    csum_start=u16,
    csum_offset=u16,
    num_buffers=u16,
)


@settings(max_examples=200)
@given(hdr=headers)
def test_header_round_trips_in_both_sizes(hdr: VirtioNetHdr) -> None:
    twelve = hdr.pack(12)
    assert len(twelve) == 12 and twelve[:10] == hdr.pack(10) == hdr.pack()
    assert VirtioNetHdr.unpack(twelve, 12) == hdr
    short = VirtioNetHdr.unpack(hdr.pack(10) + b"trailing frame bytes", 10)
    assert short == VirtioNetHdr(
        hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset
    )


def test_header_layout_is_the_c_struct_in_host_order() -> None:
    hdr = VirtioNetHdr(1, 0x81, 0x0102, 0x0304, 0x0506, 0x0708, 0x090A)
    assert hdr.pack(12) == struct.pack("=BBHHHHH", 1, 0x81, 0x102, 0x304, 0x506, 0x708, 0x90A)
    assert hdr.needs_csum and not hdr.data_valid
    assert hdr.gso == virtio_net.VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4  # ECN bit masked


def test_bad_header_sizes_are_typed_errors() -> None:
    with pytest.raises(VirtioNetError, match="10 or 12"):
        VirtioNetHdr().pack(11)
    with pytest.raises(VirtioNetError, match="needs 12 bytes"):
        VirtioNetHdr.unpack(b"\0" * 11, 12)
    with pytest.raises(TapError, match="10 or 12"):
        tap.Tap.open(vnet_hdr_size=8)
    with pytest.raises(TapError, match="bad interface name"):
        tap.Tap.open("x" * 16)


PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
int main(void) {
    printf("TUNSETIFF %lu\nTUNGETFEATURES %lu\nTUNSETOFFLOAD %lu\nTUNGETIFF %lu\n",
           (unsigned long)TUNSETIFF, (unsigned long)TUNGETFEATURES,
           (unsigned long)TUNSETOFFLOAD, (unsigned long)TUNGETIFF);
    printf("TUNGETVNETHDRSZ %lu\nTUNSETVNETHDRSZ %lu\n",
           (unsigned long)TUNGETVNETHDRSZ, (unsigned long)TUNSETVNETHDRSZ);
    printf("IFF_TAP %d\nIFF_NO_PI %d\nIFF_VNET_HDR %d\nIFF_MULTI_QUEUE %d\n",
           IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE);
    printf("TUN_F_CSUM %d\nTUN_F_TSO4 %d\nTUN_F_TSO6 %d\nTUN_F_TSO_ECN %d\nTUN_F_UFO %d\n",
           TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO);
    printf("VIRTIO_NET_HDR_F_NEEDS_CSUM %d\nVIRTIO_NET_HDR_F_DATA_VALID %d\n",
           VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID);
    printf("VIRTIO_NET_HDR_GSO_TCPV4 %d\nVIRTIO_NET_HDR_GSO_UDP %d\n",
           VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP);
    printf("VIRTIO_NET_HDR_GSO_TCPV6 %d\nVIRTIO_NET_HDR_GSO_ECN %d\n",
           VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_ECN);
    printf("sizeof_hdr %zu\nsizeof_mrg %zu\noffset_csum_offset %zu\n",
           sizeof(struct virtio_net_hdr), sizeof(struct virtio_net_hdr_mrg_rxbuf),
           offsetof(struct virtio_net_hdr, csum_offset));
    return 0;
}
"""


@pytest.mark.headers
def test_constants_match_the_linux_headers(tmp_path: Path) -> None:
    source = tmp_path / "abi.c"
    source.write_text(PROGRAM)
    subprocess.run(["gcc", "-o", str(tmp_path / "abi"), str(source)], check=True, timeout=60)
    out = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True)
    values = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    ours = {
        "TUNSETIFF": tap.TUNSETIFF,
        "TUNGETFEATURES": tap.TUNGETFEATURES,
        "TUNSETOFFLOAD": tap.TUNSETOFFLOAD,
        "TUNGETIFF": tap.TUNGETIFF,
        "TUNGETVNETHDRSZ": tap.TUNGETVNETHDRSZ,
        "TUNSETVNETHDRSZ": tap.TUNSETVNETHDRSZ,
        "IFF_TAP": tap.IFF_TAP,
        "IFF_NO_PI": tap.IFF_NO_PI,
        "IFF_VNET_HDR": tap.IFF_VNET_HDR,
        "IFF_MULTI_QUEUE": tap.IFF_MULTI_QUEUE,
        "VIRTIO_NET_HDR_GSO_ECN": virtio_net.VIRTIO_NET_HDR_GSO_ECN,
        "sizeof_hdr": 10,
        "sizeof_mrg": 12,
        "offset_csum_offset": 8,
    }
    ours |= {f.name: f.value for f in tap.TunOffload if f.name}
    ours |= {
        f.name: f.value for f in virtio_net.VirtioNetHdrFlags if f.name and "RSC" not in f.name
    }
    ours |= {g.name: g.value for g in virtio_net.VirtioNetHdrGso if g.value}
    assert values == ours
