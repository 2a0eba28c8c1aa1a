"""NBD export of a block device: `protocol` (sans-IO), `server` (trio edge), `blkfront`
(a guest's vbd as the server's disk). See docs/nbd.md."""
