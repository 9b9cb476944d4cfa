"""What every benchmark records with its figures: the machine, and rows appended to a CSV."""
from __future__ import annotations

import csv
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    """The GPU's name, or the CPU's architecture and core count when there is no GPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} {os.cpu_count()} cores, no GPU"


def append_rows(folder: str | Path, name: str, rows: list[dict]) -> Path:
    """Append `rows` to folder/name.csv (header written when the file is new)."""
    path = Path(folder) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
