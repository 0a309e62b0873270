"""SIGHUP: a real daemon re-reads its config while frames keep arriving — the new profile, budget and source settings
take over at a frame boundary, no frame is lost or analysed twice, and a bad new config leaves the running one."""

import json
import shutil
import signal
import threading

from servicekit import NotifyListener, logged_events, problems_in, start_daemon, write_config, write_frame

from waiting import wait_until

N_FRAMES = 36


def second_profile(profile_dir, tmp_path):
    """The same net under another version: its frames say which profile analysed them."""
    other = tmp_path / "profile-v1"
    shutil.copytree(profile_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "version": "1"}))
    return other


def test_sighup_swaps_profile_budget_and_sources_without_losing_or_repeating_a_frame(tmp_path, profile_dir,
                                                                                    synthetic_images):
    config = write_config(tmp_path / "lw.toml", profile_dir, runtime="threads = 1\nbudget_ms = 2000")
    first = config.read_text()
    events_path = tmp_path / "data" / "state" / "events.jsonl"
    log = tmp_path / "err.log"
    listener = NotifyListener(str(tmp_path / "notify"))
    written = threading.Event()

    def camera():
        for k in range(N_FRAMES):
            write_frame(tmp_path / "incoming", f"frame_{k:03d}.mrc", synthetic_images[k % len(synthetic_images)])
            written.wait(0.1)
        written.set()

    def frames():
        return [e for e in logged_events(events_path) if e["type"] == "frame"]

    daemon = start_daemon(config, log, notify=listener.address)
    try:
        listener.wait_for("READY", 90)
        threading.Thread(target=camera, daemon=True).start()
        wait_until(lambda: len(frames()) >= 8, 60, "the first frames")
        config.write_text(first.replace(f'"{profile_dir}"', f'"{second_profile(profile_dir, tmp_path)}"')
                          .replace("budget_ms = 2000", "budget_ms = 1234").replace("settle_s = 0.2", "settle_s = 0.3"))
        daemon.send_signal(signal.SIGHUP)
        listener.wait_for("READY", 60, count=2)
        assert listener.times("RELOADING")[0] < listener.times("READY")[1]
        good = config.read_text()
        config.write_text(good + "[runtime\n")  # not TOML
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: the new configuration is not used" in log.read_text(), 30, "the refusal")
        config.write_text(good.replace(str(tmp_path / "profile-v1"), str(tmp_path / "no-such-profile")))
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text().count("SIGHUP: the new configuration is not used") == 2, 60, "the refusal")
        written.wait(30)
        wait_until(lambda: len(frames()) >= N_FRAMES, 90, "every frame")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
        listener.close()

    evts = logged_events(events_path)
    ids = [e["event_id"] for e in evts]
    assert len(ids) == len(set(ids)), "an event was emitted twice"
    done = frames()
    expected = [f"scope:frame_{k:03d}.mrc" for k in range(N_FRAMES)]
    assert sorted(e["frame_id"].removesuffix("#0") for e in done) == expected
    profiles = [e["model_ids"]["profile"] for e in done]
    switched = profiles.index("runtime-test@1")
    assert 8 <= switched < N_FRAMES and set(profiles[:switched]) == {"runtime-test@0"}
    assert set(profiles[switched:]) == {"runtime-test@1"}, "the old profile analysed a frame after the swap"
    assert {e["runner"]["budget_ms"] for e in done[switched:]} == {1234.0}
    assert len(listener.times("READY")) == 2  # the refused configs started nothing
    text = log.read_text()
    refusals = [line for line in problems_in(text) if "SIGHUP" in line]
    assert len(refusals) == 2 and "not valid TOML" in refusals[0] and "no-such-profile" in refusals[1], text[-3000:]
    assert not [line for line in problems_in(text) if "SIGHUP" not in line], text[-3000:]
