"""Every built-in mechanism; importing this package registers them all."""
from attnlab.mechanisms import pool, sequence, spatial  # noqa: F401
