"""A tiny random transformers Llama (6 query heads, 2 KV heads: GQA) for the inference-probe tests."""
import torch


def tiny_llama(layers: int = 3, seed: int = 0, impl: str = "sdpa", double: bool = False):
    import transformers
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(c).eval()
    model.set_attn_implementation(impl)
    return model.double() if double else model
