"""Internal helpers: validation, soft imports, atomic I/O, logging, data roots."""
