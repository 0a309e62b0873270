"""Config: defaults, every error names its key, relative paths, check-config."""

import pytest

from latticewatch.cli import main
from latticewatch.config import ConfigError, FolderSourceConfig, load_config, parse_config


def test_defaults_are_safe():
    config = load_config(None)
    assert config.profile == "nanoparticles" and config.runtime.runner == "pipelined"
    assert config.state_dir.as_posix() == "latticewatch-data/state"
    (name, source), = config.sources.items()
    assert name == "incoming" and isinstance(source, FolderSourceConfig) and source.path.as_posix() == "incoming"


@pytest.mark.parametrize("data, message", [
    ({"profle": "x"}, "profle: unknown key; allowed here: profile, data_dir, runtime, sources"),
    ({"runtime": {"runner": "fast"}}, "runtime.runner: Input should be 'pipelined' or 'inline'"),
    ({"runtime": {"budget_ms": 0}}, "runtime.budget_ms: Input should be greater than 0"),
    ({"sources": {"a": {"kind": "folder", "settle": 1}}}, "sources.a.settle: unknown key; allowed here: kind, path, polling"),
    ({"sources": {"a": {"kind": "zmq", "socket": "push"}}}, "sources.a.socket: Input should be 'pull' or 'sub'"),
    ({"sources": {"a": {"kind": "zmq", "address": "127.0.0.1:5"}}}, "sources.a.address: must be a ZeroMQ endpoint"),
    ({"sources": {"a": {"kind": "ftp"}}}, "sources.a.kind: unknown source kind 'ftp'; allowed: folder, zmq"),
    ({"sources": {"a": {"path": "x"}}}, "sources.a.kind: missing; allowed: folder, zmq"),
    ({"sources": {"a b": {"kind": "folder"}}}, "sources.a b: source names may use letters, digits"),
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
    assert main(["check-config", str(cfg)]) == 0
    cfg.write_text('[runtime]\nqueue_size = "big"\n')
    assert main(["check-config", str(cfg)]) == 2
    assert f"{cfg}: runtime.queue_size: Input should be a valid integer" in capsys.readouterr().err
    cfg.write_text("profile = \n")
    assert main(["check-config", str(cfg)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
