"""A small profile for runtime tests (the randomly initialised U-Net, no forest), their frames and a ledger.

Runtime tests check plumbing (exactly once, quarantine, resume), not accuracy, so they do not
wait for or depend on the trained shipped profile.
"""

import json
import shutil

import numpy as np
import pytest

from latticewatch.models.manifest import sha256_of
from latticewatch.runtime.ledger import Ledger
from latticewatch.testing.synthetic.frames import generate_frame


@pytest.fixture(scope="session")
def profile_dir(random_unet_onnx, tmp_path_factory):
    directory = tmp_path_factory.mktemp("profile")
    shutil.copy(random_unet_onnx, directory / "unet.onnx")
    manifest = {
        "name": "runtime-test",
        "version": "0",
        "files": {"unet.onnx": sha256_of(directory / "unet.onnx")},
        "segmentation": {"onnx": "unet.onnx", "pixel_size_nm": 0.05},
        # a random net is outside every domain; these tests are about plumbing (test_out_of_domain uses the shipped
        # profile), so its frames must not all be flagged
        "domain": {"max_spanning_region_fraction": None, "max_foreground_fraction": None,
                   "max_uncertain_fraction": None},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="session")
def analyser(profile_dir):
    from latticewatch.runtime.analyser import Analyser

    return Analyser(profile_dir, threads=1)


@pytest.fixture
def ledger(tmp_path):
    """An empty ledger in ``tmp_path``, closed after the test."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    yield ledger
    ledger.close()


@pytest.fixture(scope="session")
def synthetic_images():
    rng = np.random.default_rng(7)
    return [generate_frame(rng, (256, 256), 0.05).image for _ in range(8)]
