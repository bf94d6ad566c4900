"""Model code, one file per architecture family; knows nothing of HTTP, scheduling or tiers."""
