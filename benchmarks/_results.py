"""Shared by the benchmarks: each owns one marked section of RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from interp.io import atomic_write_text

RESULTS = Path(__file__).with_name("RESULTS.md")


def markers(name: str) -> tuple[str, str]:
    """The start and end comments that delimit benchmark ``name``'s section."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(text: str, name: str, path: Path = RESULTS) -> None:
    """Replace benchmark ``name``'s section of RESULTS.md (or append it); others stay."""
    start, end = markers(name)
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    atomic_write_text(path, new)


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, torch version and threads (and the GPU's name on cuda)."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
