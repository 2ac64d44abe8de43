"""Networks built from registered mechanisms: Block, Transformer and its LM/classifier heads; DCAL."""
from attnlab.models.dcal import (DCALBlock, DCALClassifier, DCALOutput, DCALTransformer, GLCABlock,
                                 UncertaintyWeightedLoss, attention_rollout, select_local_queries)
from attnlab.models.transformer import Block, CausalLM, Classifier, Mlp, Transformer, parse_layer

__all__ = ["Block", "Transformer", "CausalLM", "Classifier", "Mlp", "parse_layer",
           "DCALBlock", "GLCABlock", "DCALTransformer", "DCALOutput", "DCALClassifier", "UncertaintyWeightedLoss",
           "attention_rollout", "select_local_queries"]
