"""edgeserve."""
