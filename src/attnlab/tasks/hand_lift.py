"""Hand-pose lifting: noisy 2-D keypoints of a procedural 21-joint hand -> root-relative 3-D joints (mm).

No hand data set (FreiHAND, HO-3D, InterHand) installs offline, so the hands are procedural:

- Skeleton: the FreiHAND / MANO 21-joint order, 0 wrist, then thumb 1-4 (CMC, MCP, IP, tip), index 5-8,
  middle 9-12, ring 13-16, pinky 17-20 (MCP, PIP, DIP, tip). `BONES_MM`: adult bone lengths, approximate
  (rounded typical values for an adult hand: wrist joint to middle fingertip 17.4 cm, the carpus counted in the
  wrist -> MCP bones; not taken from one table, nor from MANO's mean shape). Every hand is scaled by one factor s ~ U(1 - scale_jitter, 1 + scale_jitter).
- Hand frame (right hand): x radial (towards the thumb), y distal, z dorsal. The metacarpals (wrist -> MCP) are
  rigid, in the palm plane at SPREAD_DEG from y; the thumb's carpal bone (wrist -> CMC) likewise, and the thumb's
  chain frame is rolled THUMB_ROLL_DEG about its own axis so that its flexion crosses the palm (opposition).
- Joint angles (`LIMITS_DEG`, approximate clinical ranges of motion, rounded): per finger [abduction, flexion
  at MCP, PIP, DIP]; the thumb [CMC abduction, CMC flexion, MCP flexion, IP flexion]. Flexion turns the distal
  axis towards the palm (-z of the joint's frame) about the joint's lateral axis; abduction turns it towards
  the radial side about the joint's dorsal axis (at the MCPs and the thumb's CMC only). Sampling: a closure
  c ~ U(0, 1) per finger, every flexion lo + clip(c + N(0, 0.15^2), 0, 1) (hi - lo) (so fingers curl as a
  whole, like natural grasps), abduction uniform in its range; every angle lies inside its limits.
- Forward kinematics (`forward_kinematics`): bone vectors of the exact (scaled) lengths, so bone lengths are
  preserved exactly (up to float rounding).
- Camera: a uniformly random global rotation (normalised Gaussian quaternion), the middle MCP (joint 9)
  placed at depth U(550, 850) mm and within ±15 px of the image centre; a pinhole camera with focal length
  FOCAL_PX = 500 px and principal point at the centre of a 224 x 224 image (FreiHAND's crops are 224 px with
  focal lengths of a few hundred px that vary per image; 500 is of that order, not FreiHAND's exact intrinsics).
- Input: the projections plus N(0, sigma^2) pixel noise (sigma 2 px); each keypoint is dropped with probability
  0.1 (its coordinates zeroed and a visibility flag 0); coordinates normalised as (uv - 112) / 112, so
  inputs = (u_n * vis, v_n * vis, vis), (B, 21, 3).
- Target: the camera-frame 3-D joints minus the root joint's (`root`, default 0 = wrist; the ReJSHand code's
  config uses ROOT_INDEX = 9, the middle MCP, which `root=9` gives), in mm, (B, 21, 3).

A batch is a pure function of (options, seed, split, index) (Task.generator); val draws other streams than
train, and `test_batch` a third one (the claim's held-out poses). Metrics (`pose_metrics`): MPJPE (mean over
joints of the Euclidean error, mm) and PA-MPJPE (the same after the similarity transform, scale + rotation +
translation, that best aligns the prediction to the truth: `procrustes_align`, Umeyama's solution, our own
code); quality = "mpjpe", lower is better (higher_is_better = False, as for every error-type quality here).
The loss is the official code's: L1 of the joints (here in units of UNIT_MM = 100 mm, which the model predicts).

The model is ReJSHand's FeatureChat lifter (attnlab.models.rejshand); block_options: attention (False = no
attention in any block), conv, skip, coord_attn (the ablations and the coordinate-attention variant), and
model="mlp" for the MLP baseline, its width matched to the parameters of the lifter the same dim / num_heads /
layers would build (mlp_depth residual layers, default 2). The FeatureChat block has no MLP, so the trainer's
mlp_ratio is accepted and not used.

FreiHAND's published numbers (ReJSHand: PA-MPJPE 6.3 mm) are NOT comparable with this task's: real images
through a backbone, a real hand-shape distribution, FreiHAND's own cameras and evaluation; here the input is
2-D keypoints of procedural hands.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from attnlab.models.rejshand import MLPLifter, NUM_JOINTS, ReJSHandLifter, mlp_width_for
from attnlab.tasks import Batch, Task, register_task

IMAGE_PX = 224
FOCAL_PX = 500.0
UNIT_MM = 100.0                     # the model predicts joints in units of 10 cm
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
# Bone lengths (mm), per finger: [wrist -> base joint, base -> 2nd, 2nd -> 3rd, 3rd -> tip]. Approximate.
BONES_MM = torch.tensor([
    [30.0, 45.0, 32.0, 28.0],       # thumb: wrist -> CMC (carpal), metacarpal, proximal phalanx, distal (to tip)
    [80.0, 40.0, 24.0, 22.0],       # index: wrist -> MCP (carpus + metacarpal), proximal, middle, distal (to tip)
    [78.0, 44.0, 28.0, 24.0],       # middle
    [73.0, 41.0, 27.0, 23.0],       # ring
    [68.0, 33.0, 19.0, 21.0],       # pinky
], dtype=torch.float64)
# Direction of each finger's first bone in the palm plane, degrees from y (distal) towards x (radial).
SPREAD_DEG = (55.0, 15.0, 0.0, -15.0, -30.0)
THUMB_AXIS_DEG = 40.0               # the thumb chain's rest direction at the CMC, from y towards x
THUMB_ROLL_DEG = 50.0               # its roll about its own axis (flexion then crosses the palm)
# (lo, hi) degrees per finger: [abduction, flexion 1, flexion 2, flexion 3]. Approximate ranges of motion.
LIMITS_DEG = torch.tensor([
    [[-10.0, 45.0], [-10.0, 50.0], [0.0, 60.0], [-10.0, 80.0]],    # thumb: CMC abd, CMC flex, MCP flex, IP flex
    [[-15.0, 15.0], [-20.0, 90.0], [0.0, 110.0], [0.0, 80.0]],     # index: MCP abd, MCP, PIP, DIP flexion
    [[-15.0, 15.0], [-20.0, 90.0], [0.0, 110.0], [0.0, 80.0]],     # middle
    [[-15.0, 15.0], [-20.0, 90.0], [0.0, 110.0], [0.0, 80.0]],     # ring
    [[-15.0, 15.0], [-20.0, 90.0], [0.0, 110.0], [0.0, 80.0]],     # pinky
], dtype=torch.float64)
TEST_STREAM = 2                     # test_batch's stream id (train 0, val 1)


def _rot_abduction(alpha: Tensor) -> Tensor:
    """(B,) -> (B, 3, 3) in a joint frame's (lateral a, distal d, dorsal n) coordinates: d -> cos a d + sin a a."""
    c, s, z, o = alpha.cos(), alpha.sin(), torch.zeros_like(alpha), torch.ones_like(alpha)
    return torch.stack([torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _rot_flexion(theta: Tensor) -> Tensor:
    """(B,) -> (B, 3, 3) in (a, d, n) coordinates: d -> cos t d - sin t n (towards the palm), about a."""
    c, s, z, o = theta.cos(), theta.sin(), torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([torch.stack([o, z, z], -1), torch.stack([z, c, s], -1), torch.stack([z, -s, c], -1)], -2)


def _palm_frame(phi_deg: float, roll_deg: float = 0.0) -> Tensor:
    """(3, 3) frame, columns (a, d, n) in hand coordinates: d in the palm plane at phi from y towards x,
    then rolled by `roll` about d (a towards -n)."""
    phi, rho = math.radians(phi_deg), math.radians(roll_deg)
    a = torch.tensor([math.cos(phi), -math.sin(phi), 0.0], dtype=torch.float64)
    d = torch.tensor([math.sin(phi), math.cos(phi), 0.0], dtype=torch.float64)
    n = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    frame = torch.stack([a, d, n], dim=1)                                  # (3, 3), columns a, d, n
    roll = torch.tensor([[math.cos(rho), 0.0, math.sin(rho)], [0.0, 1.0, 0.0],
                         [-math.sin(rho), 0.0, math.cos(rho)]], dtype=torch.float64)
    return frame @ roll


def forward_kinematics(angles: Tensor, scale: Tensor | None = None) -> Tensor:
    """Joint angles (B, 5, 4) in radians ([abduction, flex 1, flex 2, flex 3] per finger, FINGERS order) and
    per-hand scales (B,) -> hand-frame joints (B, 21, 3) in mm (float64), wrist at the origin.

    Fingers: the metacarpal is rigid (frame F0 at SPREAD_DEG); F1 = F0 Abd(a) Flex(t1), F2 = F1 Flex(t2),
    F3 = F2 Flex(t3); joint k+1 = joint k + length_k * (F_k d). The thumb: the carpal bone is rigid, its
    chain frame at the CMC is _palm_frame(THUMB_AXIS_DEG, THUMB_ROLL_DEG), then the same three rotations.
    """
    if angles.dim() != 3 or angles.shape[1:] != (5, 4):
        raise ValueError(f"forward_kinematics: expected angles (B, 5, 4), got shape {tuple(angles.shape)}")
    angles = angles.double()
    B = angles.shape[0]
    scale = torch.ones(B, dtype=torch.float64) if scale is None else scale.double().reshape(B)
    bones = BONES_MM[None] * scale[:, None, None]                          # (B, 5, 4)
    joints = torch.zeros(B, NUM_JOINTS, 3, dtype=torch.float64)
    e_d = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for f in range(5):
        base = _palm_frame(SPREAD_DEG[f])                                  # the rigid first bone's frame
        first = joints[:, 0] + bones[:, f, 0, None] * (base @ e_d)         # (B, 3): CMC (thumb) or MCP
        joints[:, 1 + 4 * f] = first
        chain = (_palm_frame(THUMB_AXIS_DEG, THUMB_ROLL_DEG) if f == 0 else base).expand(B, 3, 3)
        frame = chain @ _rot_abduction(angles[:, f, 0]) @ _rot_flexion(angles[:, f, 1])   # (B, 3, 3)
        position = first
        for k in range(1, 4):
            if k > 1:
                frame = frame @ _rot_flexion(angles[:, f, k])
            position = position + bones[:, f, k, None] * frame[:, :, 1]    # the frame's d column
            joints[:, 1 + 4 * f + k] = position
    return joints


def sample_angles(g: torch.Generator, n: int) -> Tensor:
    """(n, 5, 4) joint angles in radians inside LIMITS_DEG: per-finger closure, see the module docstring."""
    lo, hi = LIMITS_DEG[..., 0], LIMITS_DEG[..., 1]                        # (5, 4) each
    closure = torch.rand(n, 5, 1, generator=g, dtype=torch.float64)        # (n, 5, 1)
    t = (closure + 0.15 * torch.randn(n, 5, 3, generator=g, dtype=torch.float64)).clamp(0.0, 1.0)  # (n, 5, 3)
    abduction = torch.rand(n, 5, 1, generator=g, dtype=torch.float64)      # (n, 5, 1), uniform
    u = torch.cat([abduction, t], dim=2)                                   # (n, 5, 4) in [0, 1]
    return torch.deg2rad(lo + u * (hi - lo))


def random_rotations(g: torch.Generator, n: int) -> Tensor:
    """(n, 3, 3) uniformly random rotations (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)


def project(xyz: Tensor, focal: float = FOCAL_PX, image: int = IMAGE_PX) -> Tensor:
    """Pinhole projection of camera-frame points (..., 3) (z > 0) -> pixels (..., 2), principal point at the centre."""
    c = image / 2.0
    return torch.stack([focal * xyz[..., 0] / xyz[..., 2] + c, focal * xyz[..., 1] / xyz[..., 2] + c], dim=-1)


def procrustes_align(pred: Tensor, target: Tensor) -> Tensor:
    """pred (B, J, 3) moved by the similarity transform (s R p + t, R a rotation, s > 0) that minimises the
    squared distance to target (B, J, 3) (Umeyama 1991), computed in float64 -> (B, J, 3) in pred's dtype."""
    if pred.shape != target.shape or pred.dim() != 3 or pred.shape[-1] != 3:
        raise ValueError(f"procrustes_align: expected pred and target of one shape (B, J, 3), got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    p, q = pred.double(), target.double()
    mu_p, mu_q = p.mean(1, keepdim=True), q.mean(1, keepdim=True)         # (B, 1, 3)
    p0, q0 = p - mu_p, q - mu_q                                            # (B, J, 3)
    cov = q0.transpose(1, 2) @ p0                                          # (B, 3, 3): sum_j q_j p_j^T
    U, S, Vh = torch.linalg.svd(cov)
    sign = torch.linalg.det(U @ Vh).sign()                                 # -1 where the best map reflects
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    D = torch.ones_like(S)
    D[:, 2] = sign
    R = U @ torch.diag_embed(D) @ Vh                                       # (B, 3, 3)
    var_p = p0.pow(2).sum(dim=(1, 2))                                      # (B,)
    s = (S * D).sum(1) / var_p.clamp_min(1e-12)                            # (B,)
    aligned = s[:, None, None] * p0 @ R.transpose(1, 2) + mu_q             # (B, J, 3)
    return aligned.to(pred.dtype)


def mpjpe(pred: Tensor, target: Tensor) -> Tensor:
    """Mean per-joint position error: mean over joints and examples of ||pred - target||_2 (same units)."""
    if pred.shape != target.shape:
        raise ValueError(f"mpjpe: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return (pred.double() - target.double()).norm(dim=-1).mean()


def pose_metrics(pred_mm: Tensor, target_mm: Tensor) -> dict[str, float]:
    """MPJPE and PA-MPJPE in mm of predictions against targets, both (B, J, 3) in mm."""
    return {"mpjpe": float(mpjpe(pred_mm, target_mm)),
            "pa_mpjpe": float(mpjpe(procrustes_align(pred_mm.detach(), target_mm), target_mm))}


class PlainTransformerLifter(nn.Module):
    """The plain reference: torch's own pre-norm nn.TransformerEncoder over the 21 keypoint tokens (no attnlab
    code), the same embedding (Linear(3, dim) + learned positions, std 0.02), width, heads and depth as the
    FeatureChat lifter, feed-forward 2 x dim, a final LayerNorm and a per-joint Linear(dim, 3)."""

    def __init__(self, dim: int, num_heads: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.pos = nn.Parameter(torch.randn(1, NUM_JOINTS, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, keypoints: Tensor) -> Tensor:                      # (B, 21, 3) -> (B, 21, 3)
        return self.head(self.norm(self.encoder(self.embed(keypoints) + self.pos)))


@register_task
class HandLift(Task):
    name = "hand_lift"
    kind = "regress"
    quality = "mpjpe"
    higher_is_better = False
    causal = False
    description = ("lift noisy 2-D keypoints of procedural 21-joint hands (random pose, rotation, pinhole camera, "
                   "10% dropped) to root-relative 3-D joints; MPJPE / PA-MPJPE in mm")

    def __init__(self, seed: int = 0, *, noise_px: float = 2.0, drop: float = 0.1, scale_jitter: float = 0.1,
                 root: int = 0):
        super().__init__(seed)
        for what, v, hi in (("noise_px", noise_px, None), ("drop", drop, 1.0), ("scale_jitter", scale_jitter, 0.5)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (hi is not None and v >= hi):
                raise ValueError(f"hand_lift: {what} must be a finite number in [0, {hi if hi else 'inf'}), got {v!r}")
        if not isinstance(root, int) or isinstance(root, bool) or not 0 <= root < NUM_JOINTS:
            raise ValueError(f"hand_lift: root must be a joint index in 0..{NUM_JOINTS - 1}, got {root!r}")
        self.noise_px, self.drop, self.scale_jitter, self.root = float(noise_px), float(drop), float(scale_jitter), root

    @property
    def seq_len(self) -> int:
        return NUM_JOINTS

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "noise_px": self.noise_px, "drop": self.drop, "scale_jitter": self.scale_jitter,
                "root": self.root}

    # -- data ---------------------------------------------------------------------------
    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        return self._make(self.generator(split, index), batch_size)

    def test_batch(self, index: int, batch_size: int) -> Batch:
        """Batch `index` of the held-out test stream (neither train nor val), for the claim."""
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"hand_lift: test batch index must be a non-negative int, got {index!r}")
        mix = (self.seed * 1_000_003 + TEST_STREAM * 7_919 + index * 104_729 + 17) % (2**61 - 1)
        return self._make(torch.Generator().manual_seed(mix), batch_size)

    def _make(self, g: torch.Generator, batch_size: int) -> Batch:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"hand_lift: batch_size must be a positive int, got {batch_size!r}")
        B = batch_size
        angles = sample_angles(g, B)                                       # (B, 5, 4) radians
        scale = 1.0 + self.scale_jitter * (2 * torch.rand(B, generator=g, dtype=torch.float64) - 1)   # (B,)
        local = forward_kinematics(angles, scale)                          # (B, 21, 3) mm, hand frame
        R = random_rotations(g, B)                                         # (B, 3, 3)
        depth = 550.0 + 300.0 * torch.rand(B, generator=g, dtype=torch.float64)                       # (B,)
        offset_px = 15.0 * (2 * torch.rand(B, 2, generator=g, dtype=torch.float64) - 1)              # (B, 2)
        centre = torch.cat([offset_px * depth[:, None] / FOCAL_PX, depth[:, None]], dim=1)            # (B, 3)
        rotated = local @ R.transpose(1, 2)                                # (B, 21, 3)
        xyz = rotated - rotated[:, 9:10] + centre[:, None]                 # (B, 21, 3): middle MCP at the centre
        uv = project(xyz)                                                  # (B, 21, 2) px
        noisy = uv + self.noise_px * torch.randn(B, NUM_JOINTS, 2, generator=g, dtype=torch.float64)
        visible = (torch.rand(B, NUM_JOINTS, generator=g, dtype=torch.float64) >= self.drop).double()  # (B, 21)
        half = IMAGE_PX / 2.0
        inputs = torch.cat([(noisy - half) / half * visible[..., None], visible[..., None]], dim=-1)  # (B, 21, 3)
        targets = xyz - xyz[:, self.root:self.root + 1]                    # (B, 21, 3) mm, root-relative
        return {"inputs": inputs.float(), "targets": targets.float(), "xyz": xyz.float(), "uv": uv.float(),
                "visible": visible.float(), "angles": angles.float(), "scale": scale.float()}

    # -- model and loss -----------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], *, model: str = "featurechat",
                    attention: bool = True, conv: bool = True, skip: bool = True, coord_attn: bool | dict = False,
                    mlp_depth: int = 2, pos_std: float = 0.02, mlp_ratio: float | None = None) -> nn.Module:
        """ReJSHandLifter (model="featurechat"; attention=False = no attention in any block) or the MLPLifter
        (model="mlp") matched to that lifter's parameters, or the plain-torch reference (model="plain":
        nn.TransformerEncoder, len(layers) layers). mlp_ratio is not used (the block has no MLP)."""
        if not isinstance(attention, bool):
            raise TypeError(f"hand_lift: the block option attention must be a bool, got {attention!r}")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["mhsa"] * layers
        layers = list(layers)
        if model == "featurechat":
            return ReJSHandLifter(dim, num_heads, layers if attention else [None] * len(layers), conv=conv, skip=skip,
                                  coord_attn=coord_attn, pos_std=pos_std)
        if model == "plain":
            changed = {k: v for k, v in dict(attention=attention, conv=conv, skip=skip, coord_attn=coord_attn).items()
                       if v is not (k != "coord_attn")}
            if changed:
                raise ValueError(f"hand_lift: model='plain' is torch's own encoder and takes none of the FeatureChat "
                                 f"options, got {changed}")
            return PlainTransformerLifter(dim, num_heads, len(layers))
        if model == "mlp":
            reference = ReJSHandLifter(dim, num_heads, layers, conv=conv, skip=skip, coord_attn=coord_attn)
            target = sum(p.numel() for p in reference.parameters())
            return MLPLifter(mlp_width_for(target, mlp_depth), mlp_depth)
        raise ValueError(f"hand_lift: model must be 'featurechat', 'mlp' or 'plain', got {model!r}")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        pred = model(batch["inputs"])                                      # (B, 21, 3) in UNIT_MM
        target = batch["targets"]
        if pred.shape != target.shape:
            raise ValueError(f"hand_lift: the model must predict (B, 21, 3) joints, got {tuple(pred.shape)}")
        loss = (pred.float() - target.float() / UNIT_MM).abs().mean()      # the code's L1 on the joints
        metrics = pose_metrics(pred.detach() * UNIT_MM, target)
        return loss, {"loss": loss.item(), **metrics}


__all__ = ["HandLift", "PlainTransformerLifter", "forward_kinematics", "sample_angles", "random_rotations", "project", "procrustes_align",
           "mpjpe", "pose_metrics", "BONES_MM", "LIMITS_DEG", "FINGERS", "FOCAL_PX", "IMAGE_PX", "UNIT_MM"]
