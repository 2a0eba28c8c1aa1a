"""Xenbus: the split-driver handshake as data (`core`), its xenstore edge (`handshake`) and
the keys both ends and the toolstack agree on. See docs/architecture.md for the layers."""
