"""Small helpers used by the engine: seeding, distributed setup, atomic file writes, env capture."""
