"""tools/gpu_checks.sh takes every step its header lists, and refuses a misspelt one before anything runs (on a
GPU machine whose time is counted)."""
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_checks.sh"


def test_every_step_the_header_lists_is_taken_and_a_misspelt_one_refused_at_once(tmp_path):
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    listed = re.findall(r"^# ([a-z][a-z-]+) {2,}\S", header, flags=re.MULTILINE)
    assert {"build", "kernel-tests", "kernels", "refill", "embedded"} <= set(listed), listed
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), *listed, "kernel-test"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith("unknown step kernel-test (") and done.stdout.count("unknown step") == 1, done.stdout
    assert not out.exists()  # refused before anything ran
