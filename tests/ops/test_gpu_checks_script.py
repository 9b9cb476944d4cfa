"""tools/gpu_checks.sh: the steps its header lists are the ones it checks names against and the ones it runs, and a
misspelt one is refused before anything runs (on a GPU machine whose time is counted)."""
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_checks.sh"


def test_the_listed_checked_and_run_steps_agree_and_a_misspelt_one_is_refused_at_once(tmp_path):
    text = SCRIPT.read_text()
    header, body = text.split("set -uo pipefail", 1)
    listed = re.findall(r"^# ([a-z][a-z-]+) {2,}\S", header, flags=re.MULTILINE)
    (known,) = re.findall(r'^known="([^"]+)"', body, flags=re.MULTILINE)
    run = re.findall(r"^ {4}([a-z][a-z-]+)\) step \1 ", body, flags=re.MULTILINE)
    assert {"build", "kernel-tests", "kernels", "refill", "embedded"} <= set(listed), listed
    assert sorted(listed) == sorted(known.split()) == sorted(run), (listed, known, run)
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), *listed, "kernel-test"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith("unknown step kernel-test (") and done.stdout.count("unknown step") == 1, done.stdout
    assert not out.exists()  # refused before anything ran
