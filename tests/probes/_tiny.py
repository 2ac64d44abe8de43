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


class CharTokenizer:
    """Characters -> ids 1..60 (BOS 0 first unless add_special_tokens=False): enough of a HF tokenizer's
    call for the probes' run() functions."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([0] if add_special_tokens else []) + [1 + ord(c) % 60 for c in text]
        return {"input_ids": torch.tensor([ids])}


def letters(n: int = 20000) -> str:
    """A deterministic pseudo-random lowercase text."""
    return "".join(chr(97 + (i * 7919) % 26) for i in range(n))
