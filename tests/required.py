"""A check that cannot run here skips, saying why, except where the environment names it as required.

CI's kernel environment sets MEGATRON_DAPO_REQUIRE=sglang,extension: there the SGLang contract and the extension
build must run, and an import or build that broke fails instead of skipping green. Its first environment sets
MEGATRON_DAPO_REQUIRE=slurm: the sbatch tests run against the Slurm it installs. tools/gpu_checks.sh sets gpu (and
extension for the kernel tests): a GPU check that finds no GPU fails there.
"""
import os

import pytest


def unavailable(what: str, reason: str) -> None:
    """Skip with `reason`, or fail with it where MEGATRON_DAPO_REQUIRE lists `what`."""
    if what in {word.strip() for word in os.environ.get("MEGATRON_DAPO_REQUIRE", "").split(",")}:
        pytest.fail(f"{reason} (MEGATRON_DAPO_REQUIRE lists {what!r})")
    pytest.skip(reason)
