"""The arena: benchmarks now; training and comparisons later."""
