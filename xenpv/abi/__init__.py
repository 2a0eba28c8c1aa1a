"""Byte-exact ABI of Xen's public io headers: shared rings, blkif and netif codecs."""
