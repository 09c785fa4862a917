"""The mapping engine: keeps the wanted port mappings open on the router, and none that are not wanted."""
