"""A corrupted model file: the daemon refuses to start, naming the file and the sha256 the manifest expects."""

import json
import shutil
import subprocess
import sys

from latticewatch_nanoparticles import profile_dir as SHIPPED


def test_one_flipped_byte_in_the_shipped_unet_refuses_start(tmp_path):
    profile = tmp_path / "profile"
    shutil.copytree(SHIPPED, profile, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    onnx = profile / "unet.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    expected = json.loads((profile / "manifest.json").read_text())["files"]["unet.onnx"]
    (tmp_path / "incoming").mkdir()
    config = tmp_path / "lw.toml"
    config.write_text(f'profile = "{profile}"\ndata_dir = "data"\n[events]\nenabled = false\n[metrics]\n'
                      'enabled = false\n[dashboard]\nenabled = false\n[sources.scope]\nkind = "folder"\n'
                      'path = "incoming"\n')
    done = subprocess.run([sys.executable, "-m", "latticewatch", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unet.onnx" in done.stderr and expected in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
