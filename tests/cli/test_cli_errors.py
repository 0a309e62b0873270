"""The command line's one error policy and the options every command shares.

A user error is one ``error: <message>`` line on stderr and exit code 2, never a traceback;
"some files failed" is exit code 1 (see tests/runtime/test_batch.py).
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from latticewatch.cli import build_parser, main
from latticewatch.cli.common import BASELINE_NAMES, DEFAULT_PROFILE, baseline_names
from latticewatch.cli.daemon import EVENT_TOPICS, with_overrides
from latticewatch.config import parse_config
from latticewatch.errors import ConfigError

CLI = Path(__file__).resolve().parents[2] / "daemon" / "latticewatch" / "cli"


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _usage_error(argv, capsys) -> str:
    """A bad option: argparse stops with exit code 2 and one ``error:`` line."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return _one_error_line(capsys.readouterr().err)


def test_a_user_error_is_one_line_and_exit_code_2_without_traceback(tmp_path, capsys):
    assert main(["process", str(tmp_path / "a.mrc"), "--out", str(tmp_path), "--profile", "nosuch"]) == 2
    assert "unknown profile 'nosuch'" in _one_error_line(capsys.readouterr().err)
    # an OSError on a path the user named: the path and the reason, nothing else
    assert main(["restore", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.mrc")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: no archive at {tmp_path / 'nowhere'}"
    assert main(["sort", str(tmp_path / "nosuch")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {tmp_path / 'nosuch'}: not a directory"


def test_the_installed_command_prints_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "latticewatch", "check-config", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert _one_error_line(done.stderr) == f"error: {tmp_path / 'missing.toml'}: cannot read: No such file or directory"


def test_a_config_with_several_problems_gives_one_error_line_each(tmp_path, capsys):
    cfg = tmp_path / "lw.toml"
    cfg.write_text("[runtime]\nqueue_size = 'four'\nmax_batch = 0\n")
    assert main(["check-config", str(cfg)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {cfg}: runtime.") for line in lines)


def test_bad_options_are_one_error_line_too(capsys):
    line = _usage_error(["process", "x.mrc"], capsys)
    assert line == ("error: latticewatch process: the following arguments are required: --out "
                    "(see latticewatch process --help)")
    assert "frame side must be at least 16 px" in _usage_error(["bench", "--sizes", "8"], capsys)
    bad_policy = ["process", "x.mrc", "--out", "o", "--archive-policy", "zip"]
    assert "drop[:FILL], mean or quantize:N" in _usage_error(bad_policy, capsys)


def test_events_with_an_unknown_topic_names_the_valid_ones(tmp_path, capsys):
    line = _usage_error(["events", "--state", str(tmp_path), "--topic", "bogus"], capsys)
    assert "unknown topic 'bogus'" in line and all(topic in line for topic in EVENT_TOPICS)
    args = build_parser().parse_args(["events", "--topic", "latticewatch.defect", "--topic", "frame"])
    assert args.topic == ["defect", "frame"]
    # no log there: a user error, not silence
    assert main(["events", "--state", str(tmp_path)]) == 2
    assert "no event log at" in _one_error_line(capsys.readouterr().err)


def test_replay_of_a_malformed_synthetic_source_says_what_is_expected(tmp_path, capsys):
    line = _usage_error(["replay", "synthetic:abc", "--to-folder", str(tmp_path)], capsys)
    assert "synthetic:N needs a whole number of frames" in line and "invalid literal" not in line
    no_folder = ["replay", str(tmp_path / "none"), "--to-folder", str(tmp_path)]
    assert "not a folder of micrographs" in _usage_error(no_folder, capsys)


def test_import_keras_without_torch_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as without the [train] extra
    assert main(["models", "import-keras", str(tmp_path / "w.h5"), "--name", "x", "--out", str(tmp_path / "p")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: models import-keras needs the [train] extra: pip install '.[train]'")
    assert not (tmp_path / "p").exists()


def test_baselines_take_the_same_form_everywhere():
    parser = build_parser()
    commands = {
        "evaluate": ["evaluate", "--images", "i", "--labels", "l"],
        "calibrate baselines": ["calibrate", "baselines", "--images", "i", "--labels", "l"],
        "cross-validate": ["cross-validate", "--images", "i", "--labels", "l"],
    }
    for name, argv in commands.items():
        spaced = parser.parse_args([*argv, "--baselines", "otsu", "bragg"]).baselines
        commas = parser.parse_args([*argv, "--baselines", "otsu,bragg"]).baselines
        assert baseline_names(spaced) == baseline_names(commas) == ["otsu", "bragg"], name
        assert baseline_names(parser.parse_args([*argv, "--baselines", "none"]).baselines) == [], name
    assert baseline_names(parser.parse_args(commands["evaluate"]).baselines) == list(BASELINE_NAMES)
    assert baseline_names(parser.parse_args(commands["cross-validate"]).baselines) == []
    from latticewatch.training.assess.baselines import BASELINES

    assert set(BASELINE_NAMES) == set(BASELINES)
    with pytest.raises(ConfigError, match="unknown baseline"):
        baseline_names(["sobel"])


def _commands(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_every_command_explains_itself_and_shows_its_defaults():
    for path, parser in _commands(build_parser()):
        assert parser.description, path
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, (path, action.dest)
            if action.option_strings and action.default not in (None, False, []):
                assert "default" in action.help.lower(), (path, action.dest)


def test_every_profile_option_has_the_same_default():
    defaults = {path: action.default for path, parser in _commands(build_parser())
                for action in parser._actions if action.dest == "profile"}
    assert defaults[("sort",)] == DEFAULT_PROFILE
    assert defaults.pop(("run",)) is None  # run: the config's profile unless given
    assert defaults.pop(("check-config",)) is None  # as run
    assert set(defaults.values()) == {DEFAULT_PROFILE} and len(defaults) >= 8


def test_run_and_demo_override_the_config_keys_of_the_same_name(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["run", "--profile", "graphene", "--data-dir", str(tmp_path), "--events-address",
                              "tcp://127.0.0.1:6001", "--metrics-port", "9200", "--dashboard-port", "0"])
    config = with_overrides(parse_config({}, plugin_kinds=set()), args)
    assert (config.profile, config.data_dir, config.events.address) == ("graphene", tmp_path, "tcp://127.0.0.1:6001")
    assert (config.metrics.port, config.dashboard.port) == (9200, 0)
    demo = parser.parse_args(["demo", "--dashboard-port", "8099", "--metrics-port", "0"])
    config = with_overrides(parse_config({}, plugin_kinds=set()), demo)
    assert (config.dashboard.port, config.metrics.port, config.events.address) == (8099, 0, "tcp://127.0.0.1:5557")


def test_a_bad_override_names_the_option_and_the_key(capsys):
    assert main(["run", "--metrics-port", "70000"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --metrics-port: metrics.port: ") and "65535" in line
    assert main(["run", "--events-address", "127.0.0.1:5557"]) == 2
    assert "error: --events-address: events.address: must be a ZeroMQ endpoint" in capsys.readouterr().err


def test_exit_codes_and_error_lines_are_defined_once():
    for path in sorted(CLI.glob("*.py")):
        text = path.read_text()
        if path.name != "common.py":
            assert not re.search(r"^EXIT_\w+\s*[,=]", text, re.MULTILINE), path.name
            assert not re.search(r"print\(f?[\"']error:", text), path.name


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    """``latticewatch … --json | head``: the closed pipe ends the command quietly, exit 0."""
    example = Path(__file__).resolve().parents[2] / "examples" / "au_particles_0001.mrc"
    command = [sys.executable, "-m", "latticewatch", "process", str(example), "--out", str(tmp_path), "--json"]
    producer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdout.close()  # the reader is gone before the summary is written (analysis takes seconds)
    stderr = producer.stderr.read().decode()
    assert producer.wait(120) == 0, stderr
    assert "error" not in stderr and "Traceback" not in stderr
