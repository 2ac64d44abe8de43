"""Probes: look inside trained models (attention sinks, head importance, head perturbation,
layer reuse, token reduction) through hook points and HuggingFace transformers, offline.

Empty for now; the probes issue fills it. Probes are library code: they may import registry,
ops, mechanisms and models, never the harness (bench, train, tasks, arena). HuggingFace
models need the attnlab[hf] extra.
"""
