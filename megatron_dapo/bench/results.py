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


def ops_in_use() -> str:
    """Which implementation the log-prob and loss ops run on this machine's GPU: a figure of the actor measured on
    the references is not one of the kernels."""
    from megatron_dapo.ops import extension

    if torch.cuda.is_available() and extension.use_kernel(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        return "fused kernels"
    return "pure-torch references"


def append_rows(folder: str | Path, name: str, rows: list[dict]) -> Path:
    """Append `rows` to folder/name.csv (header written when the file is new). Rows with a column the file
    lacks rewrite it with that column added (empty in the earlier rows)."""
    path = Path(folder) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier, fields = [], []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            earlier, fields = list(reader), list(reader.fieldnames or [])
    added = [key for row in rows for key in row if key not in fields]
    fields += list(dict.fromkeys(added))
    with open(path, "w" if added or not earlier else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if added or not earlier:
            writer.writeheader()
            writer.writerows(earlier)
        writer.writerows(rows)
    return path
