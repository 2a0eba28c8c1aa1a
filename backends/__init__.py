"""Backend drivers (blkback, netback) and the services they sit on (storage, switch)."""
