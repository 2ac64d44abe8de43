"""The checkpoint format: safetensors for tensors, JSON for everything else; loading never unpickles.

    ckpt/step-XXXXXXXX/model.safetensors       weights and buffers
    ckpt/step-XXXXXXXX/optimizer.safetensors   AdamW's state per parameter, '<param name>/<exp_avg|exp_avg_sq|step>'
    ckpt/step-XXXXXXXX/state.json              format, step, config, RNG states, metric windows, history, ...
    ckpt/latest                                the name of the checkpoint to resume

A checkpoint is written into a hidden temporary folder, renamed into place in one step, and only
then named by `ckpt/latest` (itself replaced atomically), so a kill at any moment leaves the
previous checkpoint intact. The newest KEEP_CHECKPOINTS are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from attnlab._io import atomic_write, fsync_dir, write_text
from attnlab.train.config import TrainConfig

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2          # the newest checkpoints kept in ckpt/ (older ones are deleted)
# Fields that may differ between a checkpoint's config and the resumed run's: more (or fewer)
# steps, and how often to save. Anything else is a different experiment.
RESUME_MAY_CHANGE = ("steps", "checkpoint_every")
STATE_KEYS = ("format", "step", "config", "rng", "history", "windows")   # what state.json must hold


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run."""


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as named CPU tensors: '<param name>/<exp_avg|exp_avg_sq|step|...>'."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer state {names[id(p)]}/{key} is a {type(value).__name__}, "
                                    "expected a tensor")
                out[f"{names[id(p)]}/{key}"] = value.detach().to("cpu").contiguous()
    return out


def _load_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                            tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = dict(model.named_parameters())
    state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition("/")
        if name not in params:
            raise CheckpointError(f"{where}: optimizer state for unknown parameter {name!r}")
        p = params[name]
        if slot == "step":                   # AdamW keeps its step count as a CPU scalar tensor
            state.setdefault(p, {})[slot] = value.clone()
        else:
            if value.shape != p.shape:
                raise CheckpointError(f"{where}: optimizer state {key} has shape {tuple(value.shape)}, "
                                      f"the parameter has {tuple(p.shape)}")
            state.setdefault(p, {})[slot] = value.to(device=p.device, dtype=p.dtype).clone()
    optimizer.state.clear()
    for p, s in state.items():
        optimizer.state[p] = s


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write ckpt/step-XXXXXXXX atomically, point ckpt/latest at it, drop older checkpoints."""
    root = out_dir / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    name, i = f"step-{step:08d}", 1
    while (root / name).exists():        # e.g. saved again at the same step after a resume
        name, i = f"step-{step:08d}-{i}", i + 1
    staging = root / f".{name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        atomic_write(staging / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
        opt = _optimizer_tensors(model, optimizer)
        atomic_write(staging / "optimizer.safetensors", lambda tmp: save_file(opt, str(tmp)))
        write_text(staging / "state.json", json.dumps({**state, "format": CHECKPOINT_FORMAT, "step": step}))
        fsync_dir(staging)
        os.replace(staging, root / name)                      # the whole checkpoint appears at once
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    fsync_dir(root)
    write_text(root / "latest", name + "\n")                  # ... and becomes the one to resume
    fsync_dir(root)
    _prune(root, keep=name)
    return root / name


def _prune(root: Path, keep: str) -> None:
    """Delete all but the newest KEEP_CHECKPOINTS checkpoint folders; `keep` (the latest) survives."""
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in [p for p in done if p.name != keep][:-(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str = "cpu") -> None:
    """Load a checkpoint folder's weights (and AdamW state) into `model` (and `optimizer`): safetensors only."""
    try:
        load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
        opt_tensors = load_file(str(folder / "optimizer.safetensors")) if optimizer is not None else {}
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot resume: checkpoint {folder} does not load ({e})") from None
    if optimizer is not None:
        _load_optimizer_tensors(model, optimizer, opt_tensors, folder)


def find_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint folder, its state.json) named by run_dir/ckpt/latest; CheckpointError otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: {run_dir} is not a folder")
    latest = run_dir / "ckpt" / "latest"
    if not latest.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint in {run_dir} ({latest} is missing; "
                              "`attnlab train --out DIR` writes one every --checkpoint-every steps)")
    name = latest.read_text().strip()
    folder = run_dir / "ckpt" / name
    if not name or "/" in name or not folder.is_dir():
        raise CheckpointError(f"cannot resume: {latest} names {name!r}, which is not a checkpoint folder in "
                              f"{run_dir / 'ckpt'}")
    for needed in ("model.safetensors", "optimizer.safetensors", "state.json"):
        if not (folder / needed).is_file():
            raise CheckpointError(f"cannot resume: checkpoint {folder} has no {needed}")
    try:
        state = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot resume: {folder / 'state.json'} is corrupt ({e})") from None
    missing = [k for k in STATE_KEYS if k not in state]
    if not isinstance(state, dict) or missing:
        raise CheckpointError(f"cannot resume: {folder / 'state.json'} lacks {missing or 'a JSON object'}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"cannot resume: {folder} has checkpoint format {state['format']!r}, "
                              f"this attnlab reads {CHECKPOINT_FORMAT}")
    return folder, state


def load_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig of the newest checkpoint in run_dir."""
    _, state = find_checkpoint(run_dir)
    return _config_of(state)


def _config_of(state: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume: the checkpoint's config is invalid ({e})") from None


def checkpoint_to_resume(run_dir: str | Path, config: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """find_checkpoint(run_dir), after checking that `config` may continue it.

    It may differ from the checkpoint's config only in RESUME_MAY_CHANGE, and must train further.
    """
    folder, state = find_checkpoint(run_dir)
    changed = {k: v for k, v in _config_of(state).differences(config).items() if k not in RESUME_MAY_CHANGE}
    if changed:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(f"cannot resume {run_dir}: the config differs in {', '.join(changed)} ({detail}); "
                              f"only {', '.join(RESUME_MAY_CHANGE)} may change when resuming")
    if config.steps <= state["step"]:
        raise CheckpointError(f"cannot resume {run_dir}: its checkpoint is at step {state['step']} and "
                              f"steps is {config.steps}; pass a larger --steps to train further")
    return folder, state
