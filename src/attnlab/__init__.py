"""attnlab: attention mechanisms from the literature behind one interface.

    import attnlab
    attn = attnlab.create("mhsa", dim=512, num_heads=8)
    y = attn(x, is_causal=True)                 # x (B, N, 512) -> (B, N, 512)
"""
from attnlab import ops
from attnlab.cache import ContextCache, KVCache
from attnlab.models import Block, CausalLM, Classifier, Transformer
from attnlab.ops._dispatch import use_backend
from attnlab.registry import MechanismSpec, create, get_spec, list_specs, register

__version__ = "0.1.0"
__all__ = ["create", "get_spec", "list_specs", "register", "MechanismSpec", "KVCache", "ContextCache", "ops",
           "use_backend", "Block", "Transformer", "CausalLM", "Classifier", "__version__"]
