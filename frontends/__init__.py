"""Frontend drivers (blkfront, netfront)."""
