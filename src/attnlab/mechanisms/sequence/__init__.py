"""Sequence mechanisms: x (B, N, C) -> (B, N, C). Importing this package registers them."""
from attnlab.mechanisms.sequence import mhsa  # noqa: F401
