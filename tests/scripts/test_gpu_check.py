"""`scripts/gpu-check` without a GPU: the dry run and a plain run write their JSON and skip the GPU steps saying
why; a step over its time limit is killed with its children and recorded; pytest's JUnit report is read back."""

import json
import os
import subprocess
import sys
import time
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it has no .py suffix)."""
    loader = SourceFileLoader("gpu_check", str(SCRIPT))
    module = module_from_spec(spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def check(tmp_path, *args):
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    return done, json.loads(out.read_text())


def test_dry_run_reports_the_environment_and_skips_the_gpu_steps(tmp_path):
    torch = pytest.importorskip("torch")
    done, results = check(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    steps = results["steps"]
    assert list(steps) == ["environment", "install", "tests", "bench"]
    env = steps["environment"]
    assert env["status"] == "ok" and env["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert env["latticewatch"] and env["cuda_available"] is torch.cuda.is_available()
    assert steps["install"]["status"] == "ok" and steps["install"]["missing"] == []
    assert steps["tests"] == {"status": "skipped", "reason": "dry run"}
    assert steps["bench"] == {"status": "skipped", "reason": "dry run"}
    assert results["dry_run"] and results["seconds"] < 60


def test_without_a_gpu_the_gpu_steps_are_skipped_with_the_reason(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the plain run would run the GPU tests and the bench")
    done, results = check(tmp_path)
    assert done.returncode == 0, done.stderr
    for step in ("tests", "bench"):
        assert results["steps"][step]["status"] == "skipped"
        assert results["steps"][step]["reason"].startswith(f"no CUDA device: torch {torch.__version__}")


def test_a_step_over_its_limit_is_killed_with_its_children(gpu_check):
    start = time.monotonic()
    done = gpu_check.run(["sh", "-c", "sleep 60 & echo $!; wait"], 1.0)
    assert done["timed_out"] and time.monotonic() - start < 10
    grandchild = Path(f"/proc/{int(done['stdout'].split()[0])}/status")
    time.sleep(0.2)
    # gone, or a zombie waiting for a reaper: not running
    assert not grandchild.exists() or "State:\tZ" in grandchild.read_text()


def test_junit_outcomes_are_read_back(gpu_check, tmp_path):
    (tmp_path / "test_three.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no GPU here')\n"
        "def test_skips(): pass\n")
    xml = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_three.py")], capture_output=True, cwd=tmp_path, timeout=120)
    cases = {c["test"].split("::")[-1]: c for c in gpu_check.junit_cases(xml)}
    assert {name: c["outcome"] for name, c in cases.items()} == {
        "test_passes": "passed", "test_fails": "failed", "test_skips": "skipped"}
    assert "one is not two" in cases["test_fails"]["message"] and cases["test_skips"]["message"] == "no GPU here"
