"""What a measured number depends on: the machine and the software, never the hostname."""
from __future__ import annotations

import os
import platform
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software_and_machine() -> dict[str, Any]:
    """torch/attnlab/python versions, platform, CPU and core count: the fields every record shares."""
    import torch

    import attnlab
    return {"torch": torch.__version__, "attnlab": attnlab.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}


def gpu_name(device: Any) -> str | None:
    """The CUDA device's name for a cuda device (a string or torch.device), else None."""
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded; None where the OS does not say."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
