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


def test_the_preamble_names_what_the_machine_has_and_a_step_past_the_budget_is_skipped(tmp_path):
    """What runs before the first step on the GPU machine (the wheels, the machine's packages in one interpreter, the
    extension check), here on whatever machine runs the tests: it must not fail there before any step, or the GPU's
    time is lost. A budget of 0 skips the step, said in the summary, and the exit status is 1."""
    import os
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECKS_BUDGET_S": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this python3
    done = subprocess.run(["bash", str(SCRIPT), str(out), "embedded"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^python 3\.\d+\.\d+ torch \S+ cuda \S+$", done.stdout, flags=re.MULTILINE), done.stdout
    assert re.search(r"^pytest \d", done.stdout, flags=re.MULTILINE) and "!! pytest" not in done.stdout, done.stdout
    summary = (out / "summary.txt").read_text()
    import torch

    why = "budget spent" if torch.cuda.is_available() else "no CUDA device"  # on the CPU it would measure the CPU
    assert re.search(rf"^embedded +skipped +- s +\({why}\)$", summary, flags=re.MULTILINE), summary
    assert (out / "gpu_checks.tgz").stat().st_size > 0


def test_a_cut_off_command_leaves_a_summary_naming_the_step_it_was_in_and_those_not_reached(tmp_path):
    """The summary is written before each step starts: a command killed in a step (an outer time limit) leaves
    that step "running" and the later ones "not reached", not a short summary that looks complete. Shown with a
    copy of the script whose build step sleeps (and that runs its steps without a GPU), killed in that step."""
    import os
    import sys
    import time

    text = SCRIPT.read_text()
    for old, new in (("build) step build 300 bash -c", "build) step build 300 sleep 60 || bash -c"),
                     ("grep -q '^cuda device: none$' \"$work/device.txt\" && gpu=no", "true")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    copy = tmp_path / "tools" / "gpu_checks.sh"
    copy.parent.mkdir()
    copy.write_text(text)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECKS_BUDGET_S": "500", "TMPDIR": str(tmp_path),  # its work folder, left by the kill
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(["bash", str(copy), str(out), "build", "kernel-tests", "embedded"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    summary = out / "summary.txt"
    while not (summary.is_file() and " running " in summary.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    os.killpg(proc.pid, 9)
    proc.wait()
    rows = [line.split()[:2] for line in summary.read_text().splitlines()[1:]]
    assert rows == [["build", "running"], ["kernel-tests", "not"], ["embedded", "not"]], summary.read_text()
