"""The source distribution carries what an install elsewhere builds from: the CUDA sources (an sdist made where the
extension is not built, a CPU torch or pip's isolated build, must still compile the kernels on a CUDA machine)."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _checkout_copy(folder: Path) -> Path:
    """The checkout's files (tracked, or new and not ignored) in `folder`: no egg-info of an earlier build, whose
    file list setuptools would reuse."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    return folder


def test_an_sdist_made_without_the_extension_holds_the_cuda_sources(tmp_path):
    source = _checkout_copy(tmp_path / "checkout")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=source,
                          env={**os.environ, "MEGATRON_DAPO_NO_EXTENSION": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("megatron_dapo-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {f"csrc/{path.name}" for path in (ROOT / "csrc").iterdir() if path.suffix in (".cpp", ".cu", ".cuh")}
    assert {"csrc/bindings.cpp", "csrc/logprob.cu", "csrc/dapo_loss.cu", "csrc/common.cuh"} <= sources
    assert sources <= names, sorted(sources - names)
    assert {"setup.py", "megatron_dapo/py.typed", "megatron_dapo/trainer/loop.py"} <= names
