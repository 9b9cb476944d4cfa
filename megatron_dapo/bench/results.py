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
    lacks rewrite it with that column added (empty in the earlier rows), into a new file put in place whole: a
    rewrite cut short leaves the earlier rows as they were. A file whose rows do not fit its header (more cells
    than columns: a line joined to another) is refused with its name, not rewritten."""
    path = Path(folder) / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier, fields = [], []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            earlier, fields = list(reader), list(reader.fieldnames or [])
        if bad := [i + 2 for i, row in enumerate(earlier) if None in row]:  # DictReader's key for extra cells
            raise ValueError(f"{path}: line(s) {bad[:5]} hold more cells than its header has columns; mend or move "
                             "the file before adding rows to it")
    # A last line without its newline (an edit by hand): an append would join the first new row to it.
    ends_open = bool(earlier) and not path.read_bytes().endswith(b"\n")
    added = [key for row in rows for key in row if key not in fields]
    fields += list(dict.fromkeys(added))
    if added or not earlier or ends_open:
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(earlier)
            writer.writerows(rows)
        partial.replace(path)
    else:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields, restval="").writerows(rows)
    return path
