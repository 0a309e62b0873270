"""Config: defaults, every error names its key, relative paths, check-config."""

import pytest

from latticewatch.cli import main
from latticewatch.config import FolderSourceConfig, load_config, parse_config
from latticewatch.errors import ConfigError


def test_defaults_are_safe():
    config = load_config(None)
    assert config.profile == "nanoparticles" and config.runtime.runner == "pipelined"
    assert config.state_dir.as_posix() == "latticewatch-data/state"
    (name, source), = config.sources.items()
    assert name == "incoming" and isinstance(source, FolderSourceConfig) and source.path.as_posix() == "incoming"


@pytest.mark.parametrize("data, message", [
    ({"profle": "x"}, "profle: unknown key; allowed here: profile, data_dir, calibration, runtime, archive, "),
    ({"events": {"address": "127.0.0.1:5557"}}, "events.address: must be a ZeroMQ endpoint"),
    ({"events": {"high_water_mark": 0}}, "events.high_water_mark: Input should be greater than or equal to 1"),
    ({"events": {"adress": "x"}},
     "events.adress: unknown key; allowed here: enabled, address, high_water_mark, status_interval_s"),
    ({"metrics": {"port": 70000}}, "metrics.port: Input should be less than or equal to 65535"),
    ({"metrics": {"rolling_frames": 0}}, "metrics.rolling_frames: Input should be greater than or equal to 1"),
    ({"runtime": {"runner": "fast"}}, "runtime.runner: Input should be 'pipelined' or 'inline'"),
    ({"runtime": {"budget_ms": 0}}, "runtime.budget_ms: Input should be greater than 0"),
    ({"runtime": {"backend": "gpu"}},
     "runtime.backend: Input should be 'auto', 'tensorrt', 'cuda', 'openvino' or 'onnxruntime' (got 'gpu')"),
    ({"sources": {"a": {"kind": "folder", "settle": 1}}},
     "sources.a.settle: unknown key; allowed here: kind, path, polling"),
    ({"sources": {"a": {"kind": "zmq", "socket": "push"}}}, "sources.a.socket: Input should be 'pull' or 'sub'"),
    ({"sources": {"a": {"kind": "zmq", "address": "127.0.0.1:5"}}}, "sources.a.address: must be a ZeroMQ endpoint"),
    ({"sources": {"a": {"kind": "ftp"}}}, "sources.a.kind: unknown source kind 'ftp'; allowed: folder, zmq"),
    ({"sources": {"a": {"path": "x"}}}, "sources.a.kind: missing; allowed: folder, zmq"),
    ({"sources": {"a b": {"kind": "folder"}}}, "sources.a b: source names may use letters, digits"),
    ({"archive": {"policy": "blur"}}, "archive.policy: bad archive policy 'blur': use drop[:FILL], mean or quantize:N"),
    ({"archive": {"policy": "quantize:20"}}, "archive.policy: bad archive policy 'quantize:20'"),
    ({"archive": {"codec": "brotli"}}, "archive.codec: unknown archive codec 'brotli': use one of auto"),
    ({"archive": {"margin_nm": -1}}, "archive.margin_nm: Input should be greater than or equal to 0"),
    ({"archive": {"max_bytes": 0}}, "archive.max_bytes: Input should be greater than 0"),
    ({"archive": {"max_age_s": "1h"}}, "archive.max_age_s: Input should be a valid number"),
    ({"archive": {"min_free_bytes": -1}}, "archive.min_free_bytes: Input should be greater than or equal to 0"),
    ({"archive": {"enabled": "maybe"}}, "archive.enabled: Input should be a valid boolean"),
    ({"archive": {"reduce": "no way"}}, "archive.reduce: Input should be a valid boolean"),
    ({"archive": {"polcy": "mean"}}, "archive.polcy: unknown key; allowed here: enabled, root, policy, margin_nm"),
    ({"calibration": "no/such/file.toml"}, "calibration: no/such/file.toml: calibration file not found"),
])
def test_errors_name_the_key_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data, plugin_kinds=set())
    assert message in str(err.value)


def test_file_paths_are_relative_to_the_file_and_check_config(tmp_path, capsys):
    cfg = tmp_path / "lw.toml"
    cfg.write_text('data_dir = "data"\n[sources.cam]\nkind = "folder"\npath = "in"\npolling = true\n')
    config = load_config(cfg)
    assert config.state_dir == tmp_path / "data" / "state" and config.sources["cam"].path == tmp_path / "in"
    assert config.archive.enabled and config.archive_root == tmp_path / "data" / "archive"
    cal = tmp_path / "cal" / "scope.toml"
    cal.parent.mkdir()
    cal.write_text('instrument = "X"\ncamera = "Y"\nsource = "test"\n'
                   '[[steps]]\nmagnification = 1e6\npixel_size_nm = 0.02\n')
    cfg.write_text('calibration = "cal/scope.toml"\n[archive]\nroot = "arc"\npolicy = "quantize:4"\n')
    config = load_config(cfg)
    assert (config.calibration, config.archive_root, config.archive.policy) == (cal, tmp_path / "arc", "quantize:4")
    cfg.write_text('data_dir = "data"\n[sources.cam]\nkind = "folder"\npath = "in"\npolling = true\n')
    (tmp_path / "in").mkdir()  # check-config, like run, wants the watched folder to exist
    assert main(["check-config", str(cfg)]) == 0
    cfg.write_text('[runtime]\nqueue_size = "big"\n')
    assert main(["check-config", str(cfg)]) == 2
    assert f"{cfg}: runtime.queue_size: Input should be a valid integer" in capsys.readouterr().err
    cfg.write_text("profile = \n")
    assert main(["check-config", str(cfg)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
