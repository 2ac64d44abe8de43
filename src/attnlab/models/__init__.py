"""Networks built from registered mechanisms: Block, Transformer and its LM/classifier heads."""
from attnlab.models.transformer import Block, CausalLM, Classifier, Mlp, Transformer, parse_layer

__all__ = ["Block", "Transformer", "CausalLM", "Classifier", "Mlp", "parse_layer"]
