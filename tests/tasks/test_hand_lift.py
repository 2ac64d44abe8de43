"""hand_lift: exact bone lengths, joint-angle limits measured from the 3-D joints, the pinhole projection, the
input noise and drops, Procrustes (hand-worked, scipy, similarity invariance), pure batches."""
import math

import pytest
import torch

from attnlab.tasks import create_task
from attnlab.tasks.hand_lift import (BONES_MM, FOCAL_PX, IMAGE_PX, LIMITS_DEG, SPREAD_DEG, forward_kinematics,
                                     mpjpe, pose_metrics, procrustes_align, project, random_rotations, sample_angles)

# (parent, child) of the 20 bones, FreiHAND order: each finger wrist -> 1st -> 2nd -> 3rd -> tip.
BONES = [(0 if k == 0 else 1 + 4 * f + k - 1, 1 + 4 * f + k) for f in range(5) for k in range(4)]


def _angle(a, b):
    """Angle (rad) between vectors (..., 3)."""
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cos.clamp(-1.0, 1.0))


@pytest.fixture(scope="module")
def task():
    return create_task("hand_lift", seed=3)


def test_bone_lengths_preserved_exactly(task):
    g = torch.Generator().manual_seed(0)
    angles, scale = sample_angles(g, 64), 0.9 + 0.2 * torch.rand(64, generator=g, dtype=torch.float64)
    joints = forward_kinematics(angles, scale)                              # float64, hand frame
    b = task.batch("train", 0, 64)                                          # float32, camera frame, rotated
    for parent, child in BONES:
        f, k = (child - 1) // 4, (child - 1) % 4
        length = BONES_MM[f, k]
        torch.testing.assert_close((joints[:, child] - joints[:, parent]).norm(dim=-1), scale * length,
                                   rtol=0, atol=1e-9)
        torch.testing.assert_close((b["xyz"][:, child] - b["xyz"][:, parent]).norm(dim=-1).double(),
                                   b["scale"].double() * length, rtol=0, atol=2e-3)


def test_straight_hand_and_a_right_angle_by_hand():
    angles = torch.zeros(1, 5, 4, dtype=torch.float64)
    joints = forward_kinematics(angles)[0]
    for f in range(1, 5):                                                   # a straight finger: tip on the metacarpal ray
        phi = math.radians(SPREAD_DEG[f])
        ray = torch.tensor([math.sin(phi), math.cos(phi), 0.0], dtype=torch.float64)
        torch.testing.assert_close(joints[4 * f + 4], BONES_MM[f].sum() * ray)
    angles[0, 2, 2] = math.pi / 2                                           # middle finger PIP at 90 degrees
    joints = forward_kinematics(angles)[0]
    proximal, middle = joints[10] - joints[9], joints[11] - joints[10]
    assert abs(float((proximal * middle).sum())) < 1e-9                     # perpendicular
    torch.testing.assert_close(middle, torch.tensor([0.0, 0.0, -BONES_MM[2, 2]], dtype=torch.float64))  # palmar


def test_angle_limits_respected():
    g = torch.Generator().manual_seed(1)
    angles = sample_angles(g, 4096)
    lo, hi = torch.deg2rad(LIMITS_DEG[..., 0]), torch.deg2rad(LIMITS_DEG[..., 1])
    assert torch.all(angles >= lo - 1e-12) and torch.all(angles <= hi + 1e-12)
    assert torch.all(angles.amin(0) < lo + 0.1) and torch.all(angles.amax(0) > hi - 0.1)   # the ranges are used
    joints = forward_kinematics(angles)
    for f in range(5):
        base = 1 + 4 * f
        v = [joints[:, base] - joints[:, 0]] + [joints[:, base + k] - joints[:, base + k - 1] for k in (1, 2, 3)]
        # The 2nd and 3rd joints flex about one lateral axis: the angle between bones is |flexion| <= its limit,
        # and the finger beyond the first joint stays in one plane.
        for k in (2, 3):
            measured = _angle(v[k - 1], v[k])
            torch.testing.assert_close(measured, angles[:, f, k].abs(), rtol=0, atol=1e-6)
            assert float(measured.max()) <= max(abs(hi[f, k]), abs(lo[f, k])) + 1e-6
        sv = torch.linalg.svdvals(torch.stack(v[1:], dim=1))               # (B, 3): rank 2 = one plane
        assert float((sv[:, 2] / sv[:, 0]).max()) < 1e-9
        if f > 0:                                                           # MCP: abduction then flexion
            expected = torch.arccos(angles[:, f, 0].cos() * angles[:, f, 1].cos())
            torch.testing.assert_close(_angle(v[0], v[1]), expected, rtol=0, atol=1e-6)
    # Flexion bends towards the palm (-z in the hand frame, for a straight MCP and positive PIP flexion).
    flat = torch.zeros(1, 5, 4, dtype=torch.float64)
    flat[0, 1:, 2] = 1.0
    j = forward_kinematics(flat)[0]
    assert all(float(j[4 * f + 3, 2] - j[4 * f + 2, 2]) < 0 for f in range(1, 5))


def test_rotations_are_proper():
    R = random_rotations(torch.Generator().manual_seed(0), 256)
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(256, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(256, dtype=torch.float64))


def test_projection_noise_drops_and_targets(task):
    b = task.batch("val", 0, 4096)
    torch.testing.assert_close(project(b["xyz"]), b["uv"])
    # By hand: a point on the optical axis lands on the principal point; (z, -z / 2, z) at (+f, -f / 2) px from it.
    pts = torch.tensor([[0.0, 0.0, 600.0], [600.0, -300.0, 600.0]])
    torch.testing.assert_close(project(pts), torch.tensor([[112.0, 112.0], [112.0 + FOCAL_PX, 112.0 - FOCAL_PX / 2]]))
    assert torch.all(b["xyz"][..., 2] > 300)
    vis = b["visible"]
    assert set(vis.unique().tolist()) <= {0.0, 1.0} and abs(float(1 - vis.mean()) - 0.1) < 0.01
    torch.testing.assert_close(b["inputs"][..., 2], vis)
    assert torch.all(b["inputs"][..., :2][vis == 0] == 0)
    half = IMAGE_PX / 2
    residual = (b["inputs"][..., :2] * half + half - b["uv"])[vis == 1]     # the pixel noise
    assert abs(float(residual.std()) - 2.0) < 0.05 and abs(float(residual.mean())) < 0.05
    torch.testing.assert_close(b["targets"], b["xyz"] - b["xyz"][:, :1], rtol=0, atol=1e-3)   # float32 at 0.5-1 m
    assert torch.all(b["targets"][:, 0] == 0)
    r9 = create_task("hand_lift", seed=3, root=9).batch("val", 0, 8)
    torch.testing.assert_close(r9["targets"], r9["xyz"] - r9["xyz"][:, 9:10], rtol=0, atol=1e-3)


def test_procrustes_by_hand_and_against_scipy():
    # By hand: a unit square in the xy plane, rotated 90 degrees about z, scaled 2, moved: aligned exactly.
    p = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]], dtype=torch.float64)
    q = 2 * torch.stack([-p[..., 1], p[..., 0], p[..., 2]], -1) + torch.tensor([5.0, -1, 3], dtype=torch.float64)
    torch.testing.assert_close(procrustes_align(p, q), q)
    # A mirror image is not a similarity with a rotation: not aligned exactly.
    tetra = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]]], dtype=torch.float64)
    assert float(mpjpe(procrustes_align(tetra, tetra * torch.tensor([1.0, 1, -1], dtype=torch.float64)),
                       tetra * torch.tensor([1.0, 1, -1], dtype=torch.float64))) > 0.1
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 21, 3, generator=g, dtype=torch.float64) * 50
    R = random_rotations(g, 6)
    y = 0.8 * x @ R.transpose(1, 2) + 10 + torch.randn(6, 21, 3, generator=g, dtype=torch.float64)
    ours = procrustes_align(x, y)
    for i in range(6):
        a, b = (x[i] - x[i].mean(0)).numpy(), (y[i] - y[i].mean(0)).numpy()
        rot, _ = scipy_linalg.orthogonal_procrustes(a, b)                   # min ||a rot - b||, rot orthogonal
        s = float((a @ rot * b).sum() / (a * a).sum())
        theirs = torch.from_numpy(s * a @ rot) + y[i].mean(0)
        torch.testing.assert_close(ours[i], theirs)


def test_pa_mpjpe_invariant_to_similarity_transforms(task):
    b = task.batch("val", 1, 32)
    target = b["targets"].double()
    pred = target + 8 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = pose_metrics(pred, target)
    R = random_rotations(torch.Generator().manual_seed(1), 32)
    moved = 1.7 * pred @ R.transpose(1, 2) + torch.tensor([30.0, -20.0, 500.0], dtype=torch.float64)
    again = pose_metrics(moved, target)
    assert again["pa_mpjpe"] == pytest.approx(base["pa_mpjpe"], rel=1e-9)
    assert again["mpjpe"] > 10 * base["mpjpe"]                              # MPJPE is not invariant
    assert base["pa_mpjpe"] <= base["mpjpe"]
    assert pose_metrics(target * 0.5 @ R[0].T + 3, target)["pa_mpjpe"] < 1e-9


def test_batches_are_pure(task):
    a, b = task.batch("train", 5, 16), task.batch("train", 5, 16)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    other = create_task("hand_lift", seed=3).batch("train", 5, 16)
    assert torch.equal(a["inputs"], other["inputs"])
    for different in (task.batch("train", 6, 16), task.batch("val", 5, 16), task.test_batch(5, 16),
                      create_task("hand_lift", seed=4).batch("train", 5, 16)):
        assert not torch.equal(a["targets"], different["targets"])
    assert torch.equal(task.test_batch(2, 8)["targets"], task.test_batch(2, 8)["targets"])


def test_options_models_and_bad_input(task):
    assert task.options() == {"seed": 3, "noise_px": 2.0, "drop": 0.1, "scale_jitter": 0.1, "root": 0}
    assert task.seq_len == 21 and task.quality == "mpjpe" and task.higher_is_better is False
    for bad in (dict(drop=1.0), dict(noise_px=-1), dict(root=21), dict(scale_jitter=0.7)):
        with pytest.raises(ValueError):
            create_task("hand_lift", **bad)
    b = task.batch("train", 0, 8)
    n = lambda m: sum(p.numel() for p in m.parameters())
    fc, mlp = task.build_model(32, 8, ["mhsa"] * 2), task.build_model(32, 8, ["mhsa"] * 2, model="mlp")
    assert abs(n(mlp) - n(fc)) / n(fc) < 0.01
    none = task.build_model(32, 8, ["mhsa"] * 2, attention=False)
    assert none.layer_names == [None, None] and n(none) < n(fc)
    for model in (fc, mlp, none, task.build_model(32, 8, 1, coord_attn=True)):
        loss, metrics = task.loss(model, b)
        assert loss.ndim == 0 and math.isfinite(loss.item()) and {"loss", "mpjpe", "pa_mpjpe"} <= set(metrics)
    with pytest.raises(ValueError, match="'featurechat', 'mlp' or 'plain'"):
        task.build_model(32, 8, 1, model="gcn")
    with pytest.raises(ValueError, match="batch_size"):
        task.batch("train", 0, 0)


def test_the_plain_reference_is_torch_s_own_encoder():
    """model="plain": torch.nn.TransformerEncoder (pre-norm, no attnlab module inside), depth = len(layers)."""
    task = create_task("hand_lift")
    plain = task.build_model(32, 8, ["mhsa"] * 3, model="plain")
    assert isinstance(plain.encoder, torch.nn.TransformerEncoder) and len(plain.encoder.layers) == 3
    assert all(m.__module__.startswith("torch.") for m in plain.modules() if m is not plain)
    layer = plain.encoder.layers[0]
    assert layer.norm_first and layer.self_attn.num_heads == 8 and layer.linear1.out_features == 64
    b = task.batch("train", 0, 4)
    assert plain(b["inputs"]).shape == (4, 21, 3)
    with pytest.raises(ValueError, match=r"model='plain' .* takes none of the FeatureChat options, got \{'conv': False\}"):
        task.build_model(32, 8, 1, model="plain", conv=False)
