"""EdgeMoEViT / TaskMoE: shapes, queue dispatch == dense compute (with gradients), the gate against a
float64 transcription of M3ViT's NoisyGate formula, per-task gates, the FLOPs counter, the numerics
switch, and a short training that learns."""
import math

import pytest
import torch

import attnlab.models.edge_moe as edge_moe
from attnlab.models.edge_moe import EdgeMoEViT, TaskGate, TaskMoE, count_params, cv_squared

TASKS = {"seg": 11, "depth": 1}


def tiny(**kw):
    opts = dict(dim=16, num_heads=2, layers=4, num_experts=4, top_k=2, expert_ratio=2.0)
    opts.update(kw)
    return EdgeMoEViT(TASKS, **opts)


def test_shapes_and_layout():
    torch.manual_seed(0)
    m = tiny()
    x = torch.randn(3, 28, 28)
    assert m(x, "seg").shape == (3, 11, 28, 28)
    assert m(x[:, None], 1).shape == (3, 1, 28, 28)
    assert m.moe_blocks == [1, 3]                               # odd blocks are MoE (M3ViT)
    assert [b.is_moe for b in m.blocks] == [False, True, False, True]
    m.eval()                                                    # no gate noise: forward_all == per-task forwards
    outs, bal = m.forward_all(x)
    assert set(outs) == {"seg", "depth"} and bal.shape == ()
    assert torch.allclose(outs["seg"], m(x, "seg"), atol=1e-6) and torch.allclose(outs["depth"], m(x, 1), atol=1e-6)
    dense = tiny(num_experts=0)
    assert dense.moe_blocks == [] and count_params(dense) < count_params(m)
    assert tiny(layers=1).moe_blocks == [0] and tiny(layers=3).moe_blocks == [1]   # one block: MoE itself


def test_patchify_round_trip():
    m = tiny()
    img = torch.randn(2, 1, 28, 28)
    tokens = m.patchify(img)                                    # (2, 49, 16)
    assert tokens.shape == (2, 49, 16)
    assert torch.equal(tokens[0, 8], img[0, 0, 4:8, 4:8].reshape(-1))   # patch (1, 1) is row 1 * 7 + 1
    assert torch.equal(m.unpatchify(tokens, 1), img)


def test_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="expected images"):
        m(torch.randn(2, 27, 27), "seg")
    with pytest.raises(ValueError, match="unknown task"):
        m(torch.randn(2, 28, 28), "normals")
    with pytest.raises(ValueError, match="task must be"):
        m(torch.randn(2, 28, 28), 2)
    with pytest.raises(ValueError, match="numerics"):
        tiny(numerics="fp8")
    with pytest.raises(ValueError, match="top_k"):
        TaskGate(8, 2, top_k=3)
    with pytest.raises(ValueError, match="dispatch"):
        m.blocks[1].mlp(torch.randn(1, 2, 16), 0, dispatch="sparse")
    with pytest.raises(NotImplementedError, match="softmax"):
        EdgeMoEViT(TASKS, 16, 2, ["mhsa", "deconstructed:fixed"], num_experts=2, numerics="edgemoe")


def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def test_queues_equal_dense_compute_with_gradients():
    torch.manual_seed(1)
    moe = TaskMoE(8, 12, num_experts=5, num_tasks=2, top_k=2).double().eval()
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for dispatch in ("queues", "dense"):
        moe.zero_grad()
        x.grad = None
        indices, weights, _ = moe.route(x, 1)                    # the gate's gradients are compared too
        y = moe.combine(x, indices, weights, dispatch)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append({**_grads(moe), "x": x.grad.clone()})
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-12), name
    # and the dense path really is "weights x expert(x)" summed over the chosen experts
    ref = torch.stack([sum(weights[t, j] * moe.experts[int(indices[t, j])](x[t]) for j in range(2))
                       for t in range(x.shape[0])])
    assert torch.allclose(outs[0], ref.detach(), atol=1e-12)


def test_full_model_queues_equal_dense_in_training_mode():
    torch.manual_seed(2)
    m = tiny().double().train()
    x = torch.randn(4, 28, 28, dtype=torch.float64)
    results = []
    for dispatch in ("queues", "dense"):
        m.zero_grad()
        torch.manual_seed(7)                                     # the same gate noise for both
        y = m(x, "depth", dispatch=dispatch)
        loss = y.square().mean() + 0.01 * m.balance_loss
        loss.backward()
        results.append((y.detach(), float(m.balance_loss.detach()), _grads(m)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-10)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-10) and results[0][1] > 0
    for name, g in results[0][2].items():
        assert torch.allclose(g, results[1][2][name], atol=1e-10), name


def _normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def reference_gate(x, w_gate, w_noise, noise, k):
    """M3ViT NoisyGate.forward + _prob_in_top_k + cv_squared, written out per token in float64 Python."""
    T, E = len(x), len(w_gate)
    clean = [[sum(x[t][c] * w_gate[e][c] for c in range(len(x[t]))) for e in range(E)] for t in range(T)]
    raw = [[sum(x[t][c] * w_noise[e][c] for c in range(len(x[t]))) for e in range(E)] for t in range(T)]
    std = [[math.log1p(math.exp(raw[t][e])) + 1e-2 for e in range(E)] for t in range(T)]
    logits = [[clean[t][e] + noise[t][e] * std[t][e] for e in range(E)] for t in range(T)]
    indices, weights, gates, load = [], [], [[0.0] * E for _ in range(T)], [0.0] * E
    for t in range(T):
        order = sorted(range(E), key=lambda e: -logits[t][e])
        top = order[:k]
        z = [math.exp(logits[t][e] - logits[t][top[0]]) for e in top]
        w = [v / sum(z) for v in z]
        indices.append(top)
        weights.append(w)
        for e, v in zip(top, w):
            gates[t][e] = v
        kth, k1th = logits[t][order[k - 1]], logits[t][order[k]]
        for e in range(E):
            thr = k1th if logits[t][e] > k1th else kth              # in the top k: against the (k+1)-th
            load[e] += _normal_cdf((clean[t][e] - thr) / std[t][e])
    importance = [sum(gates[t][e] for t in range(T)) for e in range(E)]

    def cv2(v):
        mean = sum(v) / len(v)
        var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
        return var / (mean ** 2 + 1e-10)
    return indices, weights, cv2(importance) + cv2(load)


def test_gate_matches_float64_reference_of_the_official_formula():
    torch.manual_seed(3)
    gate = TaskGate(6, 5, top_k=2).double().train()
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.manual_seed(11)
    indices, weights, loss = gate(x)
    torch.manual_seed(11)
    noise = torch.randn(9, 5, dtype=torch.float64)               # what randn_like drew
    ref_i, ref_w, ref_loss = reference_gate(x.tolist(), gate.w_gate.weight.tolist(), gate.w_noise.weight.tolist(),
                                            noise.tolist(), 2)
    assert indices.tolist() == ref_i
    assert torch.allclose(weights, torch.tensor(ref_w, dtype=torch.float64), atol=1e-12)
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-9)
    # eval: no noise, no loss, top-k of the clean logits
    gate.eval()
    i_eval, w_eval, l_eval = gate(x)
    clean = x @ gate.w_gate.weight.T
    assert torch.equal(i_eval, clean.topk(2, -1).indices) and float(l_eval) == 0.0
    assert torch.allclose(w_eval, torch.softmax(clean.topk(2, -1).values, -1))


def test_cv_squared():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(cv_squared(v)) == pytest.approx(float(v.var() / v.mean() ** 2), rel=1e-6)
    assert float(cv_squared(torch.ones(5))) == 0.0 and float(cv_squared(torch.tensor([3.0]))) == 0.0


def test_per_task_gates_differ_and_only_the_chosen_one_is_used():
    torch.manual_seed(4)
    m = tiny().eval()
    x = torch.randn(8, 28, 28)
    moe = m.blocks[1].mlp
    assert len(moe.gates) == 2
    assert not torch.equal(moe.gates[0].w_gate.weight, moe.gates[1].w_gate.weight)
    m(x, "seg")
    seg_route = moe.last_indices.clone()
    m(x, "depth")
    assert not torch.equal(seg_route, moe.last_indices)          # same tokens, other gate, other experts
    before = m(x, "seg")
    with torch.no_grad():
        for block in m.blocks:
            if block.is_moe:
                block.mlp.gates[1].w_gate.weight.normal_()       # perturb the depth task's gates only
    assert torch.equal(m(x, "seg"), before)


def test_usage_counters():
    torch.manual_seed(5)
    m = tiny().eval()
    x = torch.randn(6, 28, 28)
    m.reset_usage()
    m(x, "seg")
    m(x, "seg")
    u = m.usage()
    assert u["tokens"].shape == (2, 2, 4)
    assert u["tokens"][0].sum(-1).tolist() == [2 * 6 * 49 * 2] * 2    # images x tokens x top-2, twice
    assert u["tokens"][1].sum() == 0 and u["images"].tolist() == [12, 0]
    assert torch.all((u["experts_per_image"][0] >= 2) & (u["experts_per_image"][0] <= 4))
    m.train()
    m(x, "depth")
    assert m.usage()["images"].tolist() == [12, 0]               # training passes are not counted


def test_flops_counter_by_hand_and_by_torch():
    torch.manual_seed(6)
    eager = [{"name": "mhsa", "backend": "reference"}] * 2      # eager matmuls, which FlopCounterMode sees
    m = EdgeMoEViT(TASKS, 8, 2, eager, num_experts=3, top_k=2, expert_ratio=1.5, mlp_ratio=2.0).eval()
    N, C = 49, 8
    attention = 2 * N * C * 3 * C + 2 * 2 * N * N * C + 2 * N * C * C          # qkv, qk^T, pv, proj
    hand = {"patch_embed": 2 * N * 16 * C, "attention": 2 * attention, "mlp": 2 * 2 * N * C * 16,
            "experts": N * 2 * 2 * 2 * C * 12, "gates": 2 * N * C * 3, "head": 2 * N * C * 11 * 16}
    hand["total"] = sum(hand.values())
    assert m.flops("seg") == hand
    assert m.flops("depth")["head"] == 2 * N * C * 1 * 16
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 28, 28)
    for task in ("seg", "depth"):
        with FlopCounterMode(display=False) as counter:
            m(x, task)
        assert counter.get_total_flops() == m.flops(task)["total"], task
    dense = EdgeMoEViT(TASKS, 8, 2, eager, num_experts=0, mlp_ratio=2.0).eval()
    with FlopCounterMode(display=False) as counter:
        dense(x, "seg")
    assert counter.get_total_flops() == dense.flops("seg")["total"]
    assert m.flops("seg")["total"] - dense.flops("seg")["total"] == hand["experts"] + hand["gates"] - 2 * 2 * N * C * 16


def test_numerics_switch_changes_softmax_and_gelu(monkeypatch):
    import attnlab.ops.numerics as numerics
    torch.manual_seed(7)
    m = tiny().eval()
    x = torch.randn(2, 28, 28)
    exact = m(x, "seg")
    calls = {"softmax": 0, "gelu": 0}
    real_softmax, real_gelu = numerics.SOFTMAXES["edgemoe"], edge_moe.edgemoe_gelu

    def softmax(*a, **k):
        calls["softmax"] += 1
        return real_softmax(*a, **k)

    def gelu(*a, **k):
        calls["gelu"] += 1
        return real_gelu(*a, **k)
    monkeypatch.setitem(numerics.SOFTMAXES, "edgemoe", softmax)
    monkeypatch.setattr(edge_moe, "edgemoe_gelu", gelu)
    assert m(x, "seg").equal(exact) and calls == {"softmax": 0, "gelu": 0}
    m.set_numerics("edgemoe")
    assert all(b.attn.softmax == "edgemoe" for b in m.blocks)
    approx = m(x, "seg")
    assert calls["softmax"] == 4                                 # one per block
    loaded = sum(len(set(m.blocks[i].mlp.last_indices.reshape(-1).tolist())) for i in m.moe_blocks)
    assert calls["gelu"] == 2 + loaded                           # 2 dense MLPs + each non-empty expert queue once
    diff = (approx - exact).abs().max()
    assert 0 < diff < 1e-2                                       # an approximation, a close one
    m.set_numerics("exact")
    assert torch.allclose(m(x, "seg"), exact, atol=1e-6)
    built = tiny(numerics="edgemoe")
    assert built.blocks[0].attn.softmax == "edgemoe" and built.blocks[0].mlp.act.numerics == "edgemoe"


def test_balance_loss_only_in_training():
    torch.manual_seed(8)
    m = tiny()
    x = torch.randn(4, 28, 28)
    m.train()
    m(x, "seg")
    assert float(m.balance_loss.detach()) > 0 and m.balance_loss.requires_grad
    m.eval()
    m(x, "seg")
    assert float(m.balance_loss) == 0.0


def test_short_training_learns(tmp_path):
    pytest.importorskip("safetensors")
    from attnlab.tasks import create_task
    from attnlab.train import TrainConfig, train
    try:
        task = create_task("fashion_dense", train_size=2000)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    torch.set_num_threads(1)
    config = TrainConfig(task="fashion_dense", task_options={"train_size": 2000}, layers=["mhsa"] * 2, dim=32,
                         num_heads=2, block_options={"model": "moe", "num_experts": 4}, steps=80, batch_size=32,
                         lr=3e-3, warmup=10, eval_every=80, eval_batches=2, checkpoint_every=0, seed=0, threads=1)
    result = train(config, tmp_path / "run", progress=False)
    base = task.baselines(batches=2, batch_size=64)
    final = result.final
    assert final["val_miou"] > 2 * base["all_background_miou"]
    assert final["val_rmse"] < 0.8 * base["mean_depth_rmse"]
