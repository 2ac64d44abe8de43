"""attnlab.probes.heads against what it did not write: weight surgery on the output projection and
plain forward pre-hooks (ablation), finite differences of weight scaling (gradient importance),
naive loops over the patch grid written from the definitions (distance rings, ViT's mean
attention distance), planted patterns and planted heads that the probes must find exactly."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.probes import heads as H
from attnlab.probes.capture import capture

transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    c = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4)
    model = transformers.BertModel(c).eval().to(dtype)
    model.set_attn_implementation("eager")
    return model


def tiny_dinov2(seed=0):
    torch.manual_seed(seed)
    c = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  patch_size=4, image_size=16)
    model = transformers.Dinov2Model(c).eval()
    model.set_attn_implementation("eager")
    return model


def bert_batches(dtype=torch.float32, n=2):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, 50, (2, 7), generator=g)
        mask = torch.tensor([[1] * 7, [1] * (5 - i) + [0] * (2 + i)])
        out.append({"input_ids": ids, "attention_mask": mask, "target": torch.randn(2, 7, 32, generator=g).to(dtype)})
    return out


def mse_objective(model, b):
    hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    keep = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden - b["target"]) ** 2 * keep).sum() / keep.sum()


def out_proj(model, layer):
    return model.encoder.layer[layer].attention.output.dense          # BERT: per-head outputs -> residual


def objective_mean(model, batches):
    with torch.no_grad():
        return sum(float(mse_objective(model, b)) for b in batches) / len(batches)


# ------------------------------------------------------------------------------ ablation

def test_zero_ablation_equals_zeroing_output_projection_columns_head_by_head():
    model, batches = tiny_bert(), bert_batches()
    scores = H.ablation_importance(model, mse_objective, batches, mode="zero")
    base = objective_mean(model, batches)
    assert scores.base["loss"] == pytest.approx(base, rel=1e-6)
    naive = torch.zeros(2, 4, dtype=torch.float64)
    for l in range(2):
        for h in range(4):
            proj = out_proj(model, l)
            saved = proj.weight.detach().clone()
            with torch.no_grad():
                proj.weight[:, h * 8:(h + 1) * 8] = 0
            naive[l, h] = objective_mean(model, batches) - base
            with torch.no_grad():
                proj.weight.copy_(saved)
    torch.testing.assert_close(scores.scores["loss"], naive, rtol=1e-4, atol=1e-6)
    assert scores.scores["loss"].abs().min() > 0                          # every head moved the loss


def test_mean_ablation_equals_a_plain_pre_hook_with_the_masked_token_mean():
    model, batches = tiny_bert(), bert_batches()
    scores = H.ablation_importance(model, mse_objective, batches, mode="mean", token_mask=lambda b: b["attention_mask"])
    base = objective_mean(model, batches)
    naive = torch.zeros(2, 4, dtype=torch.float64)
    for l in range(2):
        proj = out_proj(model, l)
        inputs = []                                           # what the output projection reads: (B, N, h*d)
        handle = proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
        objective_mean(model, batches)
        handle.remove()
        num = sum((x * b["attention_mask"].unsqueeze(-1)).sum((0, 1)) for x, b in zip(inputs, batches))
        mean = num / sum(b["attention_mask"].sum() for b in batches)               # (h*d,) over real tokens
        for h in range(4):
            def replace(m, args, h=h):
                x = args[0].clone()
                x[..., h * 8:(h + 1) * 8] = mean[h * 8:(h + 1) * 8]
                return (x,)
            handle = proj.register_forward_pre_hook(replace)
            naive[l, h] = objective_mean(model, batches) - base
            handle.remove()
    torch.testing.assert_close(scores.scores["loss"], naive, rtol=1e-4, atol=1e-6)
    # the mask matters: the mean over padding too is another mean, another score
    unmasked = H.ablation_importance(model, mse_objective, batches, mode="mean")
    assert not torch.allclose(unmasked.scores["loss"], naive, rtol=1e-4, atol=1e-6)


def test_only_the_heads_asked_for_are_ablated_and_bad_heads_are_refused():
    model, batches = tiny_bert(), bert_batches(n=1)
    s = H.ablation_importance(model, mse_objective, batches, heads=[(1, 2)])
    assert torch.isnan(s.scores["loss"]).sum() == 7 and torch.isfinite(s.scores["loss"][1, 2])
    assert s.ranking() == [(1, 2)]
    with pytest.raises(IndexError, match="no head 4 in layer 1"):
        H.ablation_importance(model, mse_objective, batches, heads=[(1, 4)])
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        H.ablation_importance(model, mse_objective, batches, mode="resample")


# ------------------------------------------------------------------------------ gradient importance

def test_gradient_importance_equals_finite_differences_of_output_projection_scaling():
    # Michel et al.: I_h = mean over batches of |dL_b / d xi_h|; xi_h scales head h's columns of the
    # output projection, so a finite difference of that weight scaling is the same derivative.
    model, batches = tiny_bert(dtype=torch.float64), bert_batches(torch.float64)
    got = H.gradient_importance(model, mse_objective, batches)
    assert [p.grad for p in model.parameters()] == [None] * len(list(model.parameters()))   # no .grad left
    eps = 1e-6
    naive = torch.zeros(2, 4, dtype=torch.float64)
    signed = torch.zeros(2, 4, dtype=torch.float64)
    for l in range(2):
        proj = out_proj(model, l)
        saved = proj.weight.detach().clone()
        for h in range(4):
            for b in batches:
                values = []
                for s in (1 + eps, 1 - eps):
                    with torch.no_grad():
                        proj.weight.copy_(saved)
                        proj.weight[:, h * 8:(h + 1) * 8] *= s
                        values.append(float(mse_objective(model, b)))
                fd = (values[0] - values[1]) / (2 * eps)
                naive[l, h] += abs(fd) / len(batches)
                signed[l, h] += fd / len(batches)
        with torch.no_grad():
            proj.weight.copy_(saved)
    torch.testing.assert_close(got.scores["loss"], naive, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(got.signed["loss"], signed, rtol=1e-6, atol=1e-10)
    assert got.scores["loss"].min() > 1e-5
    normed = H.gradient_importance(model, mse_objective, batches, normalize_by_layer=True).scores["loss"]
    torch.testing.assert_close(normed.pow(2).sum(-1), torch.ones(2, dtype=torch.float64))


def test_gradient_is_the_first_order_ablation_and_ranks_heads_alike_when_heads_are_weak():
    # Michel et al.'s Taylor argument: L(xi_h = 0) - L(1) = -dL/d xi_h + O(second order). With every
    # head's value scaled down the heads act almost linearly: ablation change == -gradient.
    model, batches = tiny_bert(dtype=torch.float64), bert_batches(torch.float64, n=1)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.value.weight *= 1e-3
            layer.attention.self.value.bias *= 1e-3
    abl = H.ablation_importance(model, mse_objective, batches).scores["loss"]
    grad = H.gradient_importance(model, mse_objective, batches)
    torch.testing.assert_close(abl, -grad.signed["loss"], rtol=1e-2, atol=0)
    assert H.rank_correlation(abl.abs(), grad.scores["loss"]) == pytest.approx(1.0)


def test_a_planted_dominant_head_tops_both_rankings():
    model, batches = tiny_bert(), bert_batches()
    before = H.ablation_importance(model, mse_objective, batches).ranking()
    assert before[0] != (1, 2)                              # not the top head until planted
    with torch.no_grad():                                   # head (1, 2) writes 10x more into the residual
        out_proj(model, 1).weight[:, 16:24] *= 10
    abl = H.ablation_importance(model, mse_objective, batches)
    grad = H.gradient_importance(model, mse_objective, batches)
    assert abl.ranking()[0] == (1, 2) and grad.ranking()[0] == (1, 2)
    second = sorted(abl.scores["loss"].abs().flatten().tolist())[-2]
    assert abs(float(abl.scores["loss"][1, 2])) > 1.5 * second


def test_drift_objective_has_no_gradient_at_the_unablated_model_so_run_uses_mnrl():
    model = tiny_bert(dtype=torch.float64)
    pairs = [(torch.randint(0, 50, (5,)), torch.randint(0, 50, (5,))) for _ in range(4)]
    ids = torch.stack([a for a, _ in pairs] + [b for _, b in pairs])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = F.normalize(H.mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"]), dim=-1)
    batch = {"inputs": inputs, "ref": ref, "n": 4}
    drift = H.gradient_importance(model, H.encoder_objective, [batch], key="drift").scores["drift"]
    mnrl = H.gradient_importance(model, H.encoder_objective, [batch], key="mnrl").scores["mnrl"]
    assert drift.max() < 1e-12 and mnrl.min() > 1e-4
    abl = H.ablation_importance(model, H.encoder_objective, [batch]).scores["drift"]
    assert abl.min() > 1e-6                                  # while ablating a head does move the embedding
    with pytest.raises(ValueError, match="say which with key="):
        H.gradient_importance(model, H.encoder_objective, [batch])


def test_rank_correlation_and_top_overlap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = b[0]                                             # ties
    assert H.rank_correlation(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    a[3] = np.nan
    keep = ~np.isnan(a)
    assert H.rank_correlation(a, b) == pytest.approx(scipy_stats.spearmanr(a[keep], b[keep]).statistic)
    assert H.top_overlap([5, 4, 3, 2, 1], [1, 4, 5, 2, 3], 2) == 0.5


# ------------------------------------------------------------------------------ spatial profiles

def naive_profiles(pattern, grid, prefix, patch):
    """Loops from the definitions: ring mass (Chebyshev), CLS mass and ViT's mean distance (px)."""
    B, h, N, _ = pattern.shape
    rows, cols = grid
    R = max(rows, cols)
    mass = np.zeros((h, R))
    cls = np.zeros(h)
    dist = np.zeros(h)
    for head in range(h):
        for b in range(B):
            for q in range(prefix, N):
                qy, qx = divmod(q - prefix, cols)
                row_dist, row_mass = 0.0, 0.0
                for k in range(N):
                    a = float(pattern[b, head, q, k])
                    if k < prefix:
                        cls[head] += a
                        continue
                    ky, kx = divmod(k - prefix, cols)
                    mass[head, max(abs(qy - ky), abs(qx - kx))] += a
                    row_dist += a * math.hypot(qy - ky, qx - kx) * patch
                    row_mass += a
                dist[head] += row_dist / row_mass
    n = B * (N - prefix)
    return mass / n, cls / n, dist / n


def test_rings_and_mean_distance_match_naive_loops_on_random_patterns():
    torch.manual_seed(0)
    grid, prefix, patch = (3, 4), 1, 14
    N = prefix + 12
    pattern = torch.randn(2, 3, N, N).mul(2).softmax(-1)
    layout, labels = H.grid_layout(grid, prefix=prefix, patch_size=patch)
    bins, dist, keys, queries = layout(N, N)
    mass = H.distance_mass(pattern, bins, len(labels), queries)
    mean = H.mean_attention_distance(pattern, dist, queries, keys)
    n_mass, n_cls, n_dist = naive_profiles(pattern, grid, prefix, patch)
    assert labels == ["0", "1", "2", "3"]
    np.testing.assert_allclose(mass.numpy(), n_mass, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(1 - mass.sum(-1).numpy(), n_cls, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mean.numpy(), n_dist, rtol=1e-6)
    # ring sizes: a uniform pattern over patches puts mass in proportion to the keys in each ring
    uniform = torch.zeros(1, 1, N, N)
    uniform[..., prefix:] = 1 / 12
    np.testing.assert_allclose(H.distance_mass(uniform, bins, 4, queries)[0].numpy() * 12,
                               H.ring_sizes(grid).numpy(), rtol=1e-6)
    ref_mass, ref_dist = H.uniform_reference(layout, N, 4)
    np.testing.assert_allclose(ref_mass.numpy() * 12, H.ring_sizes(grid).numpy(), rtol=1e-6)
    assert ref_dist == pytest.approx(naive_profiles(uniform.expand(1, 1, N, N), grid, prefix, patch)[2][0])


def test_token_distance_bins():
    bins, labels = H.token_distance_bins(9)
    assert labels == ["0", "1", "2-3", "4-7", "8"]
    d = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs()
    for dd, b in [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4)]:
        assert torch.all(bins[d == dd] == b)


def planted_pattern_edit(p, hook):
    """Layer 1 head 2: every patch query attends uniformly to the patches at Chebyshev distance 2.
    Layer 0 head 1: 0.9 on CLS, 0.1 on itself. Layer 0 head 3: half CLS only, half a neighbour."""
    rings = H.grid_distances((4, 4))
    p = p.clone()
    if hook.layer == 1:
        ring2 = (rings == 2).to(p.dtype)
        p[:, 2, 1:, :] = 0
        p[:, 2, 1:, 1:] = ring2 / ring2.sum(-1, keepdim=True)
    if hook.layer == 0:
        p[:, 1, 1:, :] = 0
        p[:, 1, 1:, 0] = 0.9
        p[:, 1, 1:, 1:] = 0.1 * torch.eye(16)
        # head 3: the top two patch rows look only at CLS, the others at the next patch in their row
        p[:, 3, 1:, :] = 0
        p[:, 3, 1:9, 0] = 1
        for q in range(8, 16):
            p[:, 3, 1 + q, 1 + (q + 1 if q % 4 < 3 else q - 1)] = 1
    return p


def test_planted_ring_and_cls_heads_are_found_exactly_through_capture():
    model = tiny_dinov2()
    pixels = torch.randn(2, 3, 16, 16)
    layout, labels = H.grid_layout((4, 4), prefix=1, patch_size=4)
    forward = lambda m, x: m(pixel_values=x)
    edits = {f"blocks.{l}.attn.hook_pattern": planted_pattern_edit for l in range(2)}
    prof = H.attention_profiles(model, forward, [pixels], layout, labels, unit="px", distance_name="ring", edits=edits)
    assert prof.mass.shape == (2, 4, 4)
    torch.testing.assert_close(prof.mass[1, 2], torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))
    torch.testing.assert_close(prof.mass[0, 1], torch.tensor([0.1, 0, 0, 0], dtype=torch.float64))
    assert prof.prefix_mass[0, 1] == pytest.approx(0.9) and prof.mean_distance[0, 1] == pytest.approx(0.0)
    # queries with no patch attention have no distance: the mean is over the others (one patch, 4 px)
    assert prof.prefix_mass[0, 3] == pytest.approx(0.5) and prof.mean_distance[0, 3] == pytest.approx(4.0)
    all_cls = torch.zeros(1, 1, 17, 17)
    all_cls[..., 0] = 1
    _, dist, keys, queries = layout(17, 17)
    assert torch.isnan(H.mean_attention_distance(all_cls, dist, queries, keys)).all()
    # the mean distance of the ring-2 head: each query's mean over its ring-2 keys, in pixels
    c = H.grid_coordinates((4, 4)).double()
    rings = H.grid_distances((4, 4))
    expect = np.mean([float(torch.linalg.norm(c[rings[q] == 2] - c[q], dim=-1).mean()) * 4 for q in range(16)])
    assert prof.mean_distance[1, 2] == pytest.approx(expect)
    # nothing else looks like the planted heads, and the clustering puts each alone or with its kind
    others = [(l, h) for l in range(2) for h in range(4) if (l, h) not in [(1, 2), (0, 1), (0, 3)]]
    assert all(prof.mass[l, h].max() < 0.9 and prof.prefix_mass[l, h] < 0.5 for l, h in others)
    labels_, info = H.cluster_heads(prof.normalized().reshape(8, -1).numpy(), k=3)
    assert labels_[0 * 4 + 1] == 0                            # all its patch attention on itself: the most local
    assert labels_[1 * 4 + 2] != labels_[0 * 4 + 1]
    # the patterns the capture recorded are the edited ones: the model's own run agrees
    with capture(model, names="blocks.1.attn.hook_pattern", edits=edits) as cap:
        model(pixel_values=pixels)
    assert torch.all(cap["blocks.1.attn.hook_pattern"][:, 2, 1:, 0] == 0)


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_cluster_heads_separates_planted_local_and_global_profiles(method):
    rng = np.random.default_rng(0)
    sizes = H.ring_sizes((8, 8)).numpy()
    local = np.array([0.5, 0.4, 0.1] + [0.0] * 5)
    glob = sizes / sizes.sum()
    X = np.stack([local + rng.normal(0, 0.01, 8) for _ in range(7)] + [glob + rng.normal(0, 0.01, 8) for _ in range(9)])
    order = rng.permutation(16)
    labels, info = H.cluster_heads(X[order], method=method)
    assert info["k"] == 2
    truth = (order >= 7).astype(int)                         # local heads first: cluster 0 is the local one
    assert np.array_equal(labels, truth)
    assert set(info["silhouette"]) == {2, 3, 4, 5, 6}


# ------------------------------------------------------------------------------ run

class CharTokenizer:
    """A stand-in for a HuggingFace tokenizer: characters -> ids, [CLS]=2 ... [SEP]=1, pad 0."""

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None):
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        ids = [[2] + [3 + ord(ch) % 40 for ch in t][:(max_length or 10 ** 9) - 2] + [1] for t in texts]
        if single and return_tensors is None:
            return {"input_ids": ids[0]}
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


def check_outputs(doc, out, L, h):
    for f in ["heads.md", "heads.json", "importance_grid.png", "distance_curves.png", "mean_distance.png", "clusters.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert json.loads((out / "heads.json").read_text())["layers"] == L
    assert (doc["layers"], doc["heads"]) == (L, h)
    assert np.array(doc["spatial"]["mean_distance"]).shape == (L, h)
    md = (out / "heads.md").read_text()
    assert sum(line.startswith(f"| {l} | ") for line in md.splitlines() for l in range(L)) == L * h


def test_run_on_a_tiny_dinov2(tmp_path):
    model = tiny_dinov2()
    doc = H.run(model, out=tmp_path, images=torch.randn(2, 3, 16, 16))
    check_outputs(doc, tmp_path, 2, 4)
    assert set(doc["ablation"]) == {"zero", "mean"} and set(doc["ablation"]["zero"]) == {"drift", "invariance"}
    assert doc["gradient"]["key"] == "invariance" and (tmp_path / "importance_agreement.png").is_file()
    assert doc["spatial"]["bins"] == ["0", "1", "2", "3"] and doc["spatial"]["unit"] == "px"
    assert doc["base"]["drift"] == pytest.approx(0, abs=1e-6)


def test_run_on_a_tiny_text_encoder_and_causal_lm(tmp_path):
    doc = H.run(tiny_bert(), out=tmp_path / "bert", tokenizer=CharTokenizer(), config=H.HeadsConfig(modes=("zero",)))
    check_outputs(doc, tmp_path / "bert", 2, 4)
    assert doc["gradient"]["key"] == "mnrl" and doc["base"]["mnrl"] > 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    lm = transformers.LlamaForCausalLM(c).eval()
    lm.set_attn_implementation("eager")
    cfg = H.HeadsConfig(modes=("zero",), text_path=str(corpus), seq_len=16, sequences=2)
    doc = H.run(lm, out=tmp_path / "llama", tokenizer=CharTokenizer(), config=cfg)
    check_outputs(doc, tmp_path / "llama", 2, 4)
    assert doc["base"]["nll"] == pytest.approx(math.log(50), rel=0.1)        # random weights: about uniform
    mass = np.array(doc["spatial"]["mass"])
    assert np.allclose(mass.sum(-1), 1)                                         # no key is left out in text
    with pytest.raises(FileNotFoundError, match=r"tinyshakespeare: path=.*is not a file.*text_path="):
        H.run(lm, out=tmp_path / "x", tokenizer=CharTokenizer(), config=H.HeadsConfig(text_path=str(tmp_path / "no")))


def test_run_on_an_attnlab_model_with_its_task_loss(tmp_path):
    from attnlab.models import CausalLM
    torch.manual_seed(0)
    model = CausalLM(50, 32, 4, 2).eval()
    batches = [torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def task_loss(m, tokens):
        return m(tokens[:, :-1], tokens[:, 1:])[1]
    doc = H.run(model, out=tmp_path / "lm", objective=task_loss, batches=batches, config=H.HeadsConfig(modes=("zero",)))
    check_outputs(doc, tmp_path / "lm", 2, 4)
    assert doc["base"]["loss"] > 0 and doc["agreement"][0]["objective"] == "loss"
    with pytest.raises(ValueError, match="needs objective="):
        H.run(model, out=tmp_path / "x")
    # an attnlab body on a 4 x 4 patch grid with a CLS token first: the spatial layout is the grid
    from attnlab.models import Transformer
    body = Transformer(32, 4, 2).eval()
    tokens = [torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = H.HeadsConfig(modes=("mean",), grid=(4, 4), prefix_tokens=1, patch_size=4)
    doc = H.run(body, out=tmp_path / "grid", objective=lambda m, x: m(x).pow(2).mean(), batches=tokens, config=cfg)
    check_outputs(doc, tmp_path / "grid", 2, 4)
    assert doc["spatial"]["bins"] == ["0", "1", "2", "3"] and doc["spatial"]["unit"] == "px"
    assert doc["spatial"]["uniform_distance"] == pytest.approx(H.uniform_reference(H.grid_layout((4, 4), patch_size=4)[0], 17, 4)[1])


# ------------------------------------------------------------------------------ real models

def real(name):
    assets = pytest.importorskip("attnlab.probes.assets")
    try:
        return getattr(assets, f"load_{name}")()
    except assets.MissingAsset as e:
        pytest.skip(str(e))


@pytest.mark.hf
def test_dinov2_has_local_heads_in_early_layers_and_global_heads_late():
    # ViT (Dosovitskiy et al. 2021) Fig. 7: lower layers hold local heads, the last layers attend
    # globally. Measured on DINOv2-S (docs/probes.md, head importance section): layer 0 is global too (79-109 px), layers 1-5
    # hold heads at 22-41 px, the last three layers 60-106 px; uniform attention gives 117 px.
    model = real("dinov2")
    assets = pytest.importorskip("attnlab.probes.assets")
    images, _ = H.sample_images(2)
    pixels = assets.dinov2_preprocess(images, 224)
    layout, labels = H.grid_layout((16, 16), prefix=1, patch_size=14)
    prof = H.attention_profiles(model, lambda m, x: m(pixel_values=x), [pixels], layout, labels, unit="px",
                                distance_name="ring")
    _, uniform = H.uniform_reference(layout, 257, len(labels))
    d = prof.mean_distance
    assert d.shape == (12, 6) and 110 < uniform < 125
    assert float(d[1:6].min()) < 0.35 * uniform                     # local heads
    assert float(d[-3:].median()) > float(d[1:6].median()) + 10     # later layers look further
    assert float(d[-3:].min()) > 0.4 * uniform


@pytest.mark.hf
def test_minilm_gradient_and_ablation_rankings_agree():
    model, tokenizer = real("minilm")
    pairs = H.PARAPHRASES[:8]
    enc = tokenizer([a for a, _ in pairs] + [b for _, b in pairs], padding=True, return_tensors="pt")
    inputs = {k: v for k, v in enc.items()}
    with torch.no_grad():
        ref = F.normalize(H.mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"]), dim=-1)
    batch = {"inputs": inputs, "ref": ref, "n": 8}
    abl = H.ablation_importance(model, H.encoder_objective, [batch])
    grad = H.gradient_importance(model, H.encoder_objective, [batch], key="mnrl")
    assert abl.scores["drift"].shape == (6, 12) and abl.base["mnrl"] < 0.5      # it knows these paraphrases
    assert H.rank_correlation(abl.scores["mnrl"].abs(), grad.scores["mnrl"]) > 0.5
