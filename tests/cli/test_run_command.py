"""``latticewatch run`` and ``check-config``: one validation, overrides over the file, the banner, progress, defaults.

The behaviour is the command's, so the run tests start real ``latticewatch`` processes on real
folders and a real MRC file, with the shipped profile.
"""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from pydantic import BaseModel

from latticewatch.cli import build_parser, main
from latticewatch.cli.overrides import with_overrides
from latticewatch.config import (
    BUILTIN_KINDS,
    LOOPBACK_HOSTS,
    Config,
    FolderSourceConfig,
    ZmqSourceConfig,
    endpoint_host,
    load_config,
    parse_config,
)
from latticewatch.errors import ConfigError
from latticewatch.models.manifest import sha256_of
from latticewatch.testing.synthetic.frames import generate_frame
from waiting import wait_until

#: Outputs on free ports, so the tests run beside a daemon (or each other).
FREE_PORTS = ["--metrics-port", "0", "--dashboard-port", "0", "--events-address", "tcp://127.0.0.1:0"]


def latticewatch(*args, cwd, **popen):
    return subprocess.Popen([sys.executable, "-m", "latticewatch", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            **popen)


def test_a_missing_watched_folder_is_an_error_naming_its_absolute_path_before_anything_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "latticewatch", "run", "--watch", "nowhere", *FREE_PORTS],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: --watch: {tmp_path / 'nowhere'}: no such folder (watched folders are "
                                        "never created: create it, or fix the path)"]
    assert sorted(tmp_path.iterdir()) == []  # no folder created, no state directory, no banner


def test_the_default_folder_is_not_created_either(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert f"error: sources.incoming.path (default): {tmp_path / 'incoming'}: no such folder" in err
    assert not (tmp_path / "incoming").exists() and not (tmp_path / "latticewatch-data").exists()


def _tiny_profile(directory: Path, onnx: Path, *, sha256: str | None = None) -> Path:
    directory.mkdir()
    (directory / "unet.onnx").write_bytes(onnx.read_bytes())
    manifest = {"name": "tiny", "version": "0", "files": {"unet.onnx": sha256 or sha256_of(directory / "unet.onnx")},
                "segmentation": {"onnx": "unet.onnx", "pixel_size_nm": 0.05}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_check_config_validates_the_profile_and_the_folders_exactly_as_run_does(tmp_path, capsys, random_unet_onnx):
    cfg = tmp_path / "lw.toml"
    cfg.write_text('profile = "nosuch"\n[sources.scope]\nkind = "folder"\npath = "in"\n'
                   '[sources.cam]\nkind = "zmq"\n')
    expected = [f"error: {cfg}: profile: unknown profile 'nosuch'; installed profiles: ",
                f"error: {cfg}: sources.scope.path: {tmp_path / 'in'}: no such folder"]
    for command in (["check-config", str(cfg)], ["run", "--config", str(cfg), *FREE_PORTS]):
        assert main(command) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and all(line.startswith(start) for line, start in zip(lines, expected)), lines

    # a profile directory whose model file does not match its manifest: refused by name, before anything starts
    _tiny_profile(tmp_path / "altered", random_unet_onnx, sha256="0" * 64)
    (tmp_path / "in").mkdir()
    cfg.write_text('profile = "./altered"\n[sources.scope]\nkind = "folder"\npath = "in"\n')
    assert main(["check-config", str(cfg)]) == 2
    from latticewatch.models.manifest import sha256_of

    actual = sha256_of(tmp_path / "altered" / "unet.onnx")
    assert capsys.readouterr().err.splitlines() == [
        f"error: {cfg}: profile: {tmp_path / 'altered' / 'unet.onnx'}: sha256 {actual} does not match the "
        f"manifest's {'0' * 64}; the model file was altered or damaged"]

    _tiny_profile(tmp_path / "tiny", random_unet_onnx)
    assert main(["check-config", str(cfg), "--profile", str(tmp_path / "tiny")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cfg}: ok\n") and json.loads(out.split("\n", 1)[1])["profile"] == str(tmp_path / "tiny")
    # an option names itself, not the file
    assert main(["check-config", str(cfg), "--profile", "nosuch"]) == 2
    assert capsys.readouterr().err.startswith("error: --profile: unknown profile 'nosuch'")


def test_watch_replaces_the_folder_sources_and_bind_sets_the_http_hosts(tmp_path, caplog):
    config = parse_config({"sources": {"old": {"kind": "folder", "path": "x", "polling": True, "settle_s": 3},
                                       "cam": {"kind": "zmq"}}}, plugin_kinds=set())
    args = build_parser().parse_args(["run", "--watch", str(tmp_path / "grid 1"), "--watch", "rel/cam",
                                      "--bind", "0.0.0.0"])
    with caplog.at_level(logging.WARNING, logger="latticewatch.config"):
        config = with_overrides(config, args)
    assert list(config.sources) == ["cam", "grid-1", "cam-2"]  # named after the folders; no clash with the stream
    grid, cam = config.sources["grid-1"], config.sources["cam-2"]
    assert grid.path == tmp_path / "grid 1" and cam.path == Path.cwd() / "rel" / "cam"
    assert (grid.polling, grid.settle_s) == (True, 3)  # the config's folder settings are kept
    assert (config.metrics.host, config.dashboard.host) == ("0.0.0.0", "0.0.0.0")
    assert {r.getMessage() for r in caplog.records} == {
        "metrics.host binds '0.0.0.0': reachable from other machines",
        "dashboard.host binds '0.0.0.0': reachable from other machines"}
    with pytest.raises(ConfigError, match="^--bind: metrics.host: must be a host name"):
        with_overrides(config, build_parser().parse_args(["run", "--bind", " "]))


def _listening_defaults(model: type[BaseModel], where: str):
    """Every default of a key that names something to listen on or bind (host, address), through nested tables."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _listening_defaults(field.annotation, f"{where}{name}.")
        elif ("host" in name or "address" in name) and isinstance(field.default, str):
            yield f"{where}{name}", field.default


def test_every_listener_binds_loopback_unless_configured():
    defaults = dict(_listening_defaults(Config, ""))
    for kind, model in BUILTIN_KINDS.items():
        defaults.update(_listening_defaults(model, f"sources.<{kind}>."))
    assert {"events.address", "metrics.host", "dashboard.host", "sources.<zmq>.address"} <= set(defaults)
    for key, value in defaults.items():
        host = endpoint_host(value) if value.startswith(("tcp://", "ipc://", "inproc://")) else value
        assert host is None or host in LOOPBACK_HOSTS, (key, value)
    assert ZmqSourceConfig.model_fields["bind"].default is False  # a stream source connects unless told to bind
    config = load_config(None)
    assert [type(s) for s in config.sources.values()] == [FolderSourceConfig]


def test_source_kinds_come_only_from_installed_entry_points():
    """A kind is a name an installed plugin registered, never an importable path the config could smuggle in."""
    for kind in ("latticewatch.sources.memory:MemorySource", "os:system", "latticewatch.sources.memory"):
        with pytest.raises(ConfigError, match=r"sources\.a\.kind: unknown source kind"):
            parse_config({"sources": {"a": {"kind": kind}}})


def _write_mrc(path: Path) -> None:
    image = generate_frame(np.random.default_rng(3), (256, 256), 0.05).image
    with mrcfile.new(path) as mrc:
        mrc.set_data(image.astype(np.float32))
        mrc.voxel_size = 0.5  # Å: the shipped profile's 0.05 nm


@pytest.mark.parametrize("verbose", [True, False], ids=["-v", "default"])
def test_run_with_overrides_analyses_a_real_file_and_shows_progress(tmp_path, verbose):
    incoming = tmp_path / "scope"
    incoming.mkdir()
    _write_mrc(incoming / "a.mrc")
    log = tmp_path / "stderr.log"
    proc = latticewatch(*(["-v"] if verbose else []), "run", "--watch", "scope", "--data-dir", "data",
                        "--status-interval", "0.5", *FREE_PORTS, cwd=tmp_path, stderr=log.open("w"))
    try:
        events = tmp_path / "data" / "state" / "events.jsonl"
        wait_until(lambda: events.exists() and '"frame_id":"scope:a.mrc#0"' in events.read_text().replace(" ", ""),
                   120, "the frame analysed into the --data-dir's event log")
        wait_until(lambda: "1 frames analysed" in log.read_text(), 30, "a status line")
        # idle now: six more ticks, at most one more line (the archive's queue emptying), not one per tick
        lines = log.read_text().count("frames analysed")
        time.sleep(3)
        assert log.read_text().count("frames analysed") <= lines + 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert f"  scope:     {incoming} (folder)" in text  # the banner names the path, not only the source
    frame_line = [line for line in text.splitlines() if "scope:a.mrc#0: " in line]
    if verbose:
        assert len(frame_line) == 1 and " particles, defect fraction " in frame_line[0], text
        assert frame_line[0].endswith(" ms")
    else:
        assert frame_line == [] and "Traceback" not in text


def test_run_help_states_the_precedence():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    assert "Precedence: command line > config file > defaults" in " ".join(run.format_help().split())
