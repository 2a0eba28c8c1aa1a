"""Byte-exact ABI, sans-IO: Xen's public io headers (shared rings, blkif and netif codecs),
the shared-memory buffer they read and write (`buffer`), and the virtio-net header that
frames carry on a TAP (`virtio_net`). Nothing here imports the hypervisor or xenstore."""
