"""The README's config table gives each key's default as the code has it (a table that drifted would send a user
to the wrong value for a setting they did not write down)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_dapo.config.root import load_config

README = Path(__file__).resolve().parents[2] / "README.md"


def _table_rows() -> list[tuple[list[str], list[str]]]:
    """(keys, defaults) of each row of the table under `| key | default | meaning |`, keys written as `a.b`,
    `a.b`, `c.d` or `a.{b,c}`, defaults as a comma-separated list in the same order."""
    lines = README.read_text().splitlines()
    start = lines.index("| key | default | meaning |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        keys_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        keys = []
        for written in re.findall(r"`([^`]+)`", keys_cell):
            braces = re.fullmatch(r"(.*)\.\{(.*)\}", written)
            keys += [f"{braces[1]}.{name}" for name in braces[2].split(",")] if braces else [written]
        rows.append((keys, [value.strip() for value in default_cell.split(",")]))
    return rows


def _setting(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _means(text: str, value) -> bool:
    if value is None:
        return text == "null"
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == value and (isinstance(value, float) or text.lstrip("-").isdigit())
        except ValueError:
            return False
    return text.strip('"') == value


def test_the_table_is_read():
    rows = _table_rows()
    assert len(rows) > 30 and (["rollout.n"], ["16"]) in rows
    assert (["actor.optim.lr", "actor.optim.lr_warmup_steps", "actor.optim.weight_decay", "actor.optim.grad_clip"],
            ["1e-6", "20", "0.1", "1.0"]) in rows


@pytest.mark.parametrize("keys, defaults", _table_rows(), ids=lambda v: v[0] if isinstance(v, list) else None)
def test_each_default_is_the_code_s(keys, defaults):
    if keys == ["reward.functions.SOURCE"]:  # a mapping with no entries
        assert defaults == ["—"] and load_config(None).reward.functions == {}
        return
    assert len(keys) == len(defaults), (keys, defaults)
    config = load_config(None)
    for key, text in zip(keys, defaults):
        assert _means(text, _setting(config, key)), f"README says {key} defaults to {text}; " \
                                                    f"the code has {_setting(config, key)!r}"
