"""`attnlab bench`: timing, memory and FLOPs of every mechanism against SDPA, measured in the same run."""
