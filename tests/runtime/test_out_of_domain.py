"""Frames outside the model's domain: flagged by the analyser with a reason, warned about in a typed event,
counted, left out of the statistics and archived lossless — with the shipped profile, end to end."""

import csv
import json
import threading

import jsonschema
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from latticewatch.frame import Frame
from latticewatch.io.readers import read_frames
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.pipeline import Pipeline
from latticewatch.runtime.runners import InlineRunner
from latticewatch.runtime.store import StateDir
from latticewatch.schemas import load_schema
from latticewatch.sinks.archive import ArchiveReader, ArchiveWriter
from latticewatch.sinks.dashboard import DashboardSink
from latticewatch.sinks.metrics import Metrics
from latticewatch.sources.memory import MemorySource
from latticewatch.stages.domain import DomainRules, out_of_domain
from latticewatch.testing.synthetic.frames import generate_frame
from shared_data import SHARED_DATA, requires

REAL = "real-nanoparticles"


def crystal_film(shape=(256, 256), pixel_size_nm=0.05, period_nm=0.25, seed=0):
    """A crystal filling the whole frame (a film, not particles on carbon): hexagonal fringes plus shot noise."""
    y, x = np.mgrid[: shape[0], : shape[1]] * pixel_size_nm
    k = 2 * np.pi / period_nm
    lattice = 1000 + 50 * (np.cos(k * x) + np.cos(k * (0.5 * x + 0.866 * y)))
    return np.random.default_rng(seed).poisson(lattice).astype(np.uint16)


@pytest.fixture(scope="module")
def shipped():
    return Analyser("nanoparticles", threads=1)


def test_a_region_filling_the_frame_and_undecided_probabilities_are_flagged_and_particles_are_not():
    rules = DomainRules()
    probability = np.full((100, 100), 0.05, np.float32)
    labels = np.zeros((100, 100), np.int32)
    labels[20:40, 20:40], labels[60:80, 50:70] = 1, 2
    probability[labels > 0] = 0.95
    assert out_of_domain(probability, labels, rules) == ()

    whole = np.ones((100, 100), np.int32)
    reasons = out_of_domain(np.full((100, 100), 0.99, np.float32), whole, rules)
    assert reasons[0].startswith("one region spans the frame: 100.0 %")

    undecided = np.full((100, 100), 0.45, np.float32)
    assert out_of_domain(undecided, labels, rules) == (
        "probability near 0.5: 100.0 % of pixels with p in [0.3, 0.7] (limit 50 %)",)

    # a large particle that leaves one edge free is a particle, not the whole frame
    big = np.zeros((100, 100), np.int32)
    big[:, 3:] = 1
    assert out_of_domain(np.where(big > 0, 0.99, 0.01).astype(np.float32), big, rules) == ()
    # a rule set to None is off
    off = DomainRules(max_spanning_region_fraction=None, max_foreground_fraction=None, max_uncertain_fraction=None)
    assert out_of_domain(undecided, whole, off) == ()


def test_the_shipped_profile_flags_a_crystal_film_and_not_particles_on_carbon(shipped):
    film = shipped.analyse(Frame("film", crystal_film(), 0.05))
    assert any(r.startswith("one region spans the frame") for r in film.out_of_domain), film.out_of_domain
    rng = np.random.default_rng(3)
    for i in range(3):
        normal = shipped.analyse(Frame(f"synthetic:{i}", generate_frame(rng, (256, 256), 0.05).image, 0.05))
        assert normal.regions and normal.out_of_domain == (), (i, normal.out_of_domain)


@requires(REAL, "tiles.csv")
def test_no_real_tile_is_flagged_where_the_shipped_model_gets_it_about_right(shipped):
    """The whole-frame rule must not fire on Au5nm_c31_r1 (one particle, 86 % of the tile, touching all four edges)."""
    folder = SHARED_DATA / REAL
    with open(folder / "tiles.csv", newline="") as fh:
        truth = {row["stem"]: float(row["particle_fraction"]) for row in csv.DictReader(fh)}
    for stem, fraction in truth.items():
        [frame] = read_frames(folder / "images" / f"{stem}.mrc")
        analysis = shipped.analyse(frame)
        if abs(analysis.coverage - fraction) < 0.3:
            assert analysis.out_of_domain == (), (stem, analysis.coverage, analysis.out_of_domain)


def test_daemon_warns_counts_excludes_and_archives_a_frame_outside_the_domain_lossless(shipped, tmp_path):
    rng = np.random.default_rng(3)
    images = [generate_frame(rng, (256, 256), 0.05).image, crystal_film()]
    metrics = Metrics(registry=CollectorRegistry())
    dashboard = DashboardSink(port=0)
    state = StateDir(tmp_path / "state")
    writer = ArchiveWriter(tmp_path / "archive", "s", min_free_bytes=0)
    pipeline = Pipeline(shipped, state, sinks=[metrics, dashboard], archive=writer)
    try:
        InlineRunner(pipeline).run([MemorySource(images, name="m", pixel_size_nm=0.05, closed=True)],
                                   threading.Event())
    finally:
        pipeline.close()
        dashboard.close()

    events = [json.loads(line) for line in (state.root / "events.jsonl").read_text().splitlines()]
    by_id = {e["event_id"]: e for e in events}
    warning = by_id["m:1/out-of-domain"]
    assert warning["type"] == "warning" and warning["kind"] == "model_out_of_domain" and warning["reasons"]
    jsonschema.Draft202012Validator(load_schema("warning"), format_checker=jsonschema.FormatChecker()).validate(warning)
    assert by_id["m:1/frame"]["out_of_domain"] == warning["reasons"]
    assert by_id["m:0/frame"]["out_of_domain"] == [] and "m:0/out-of-domain" not in by_id
    jsonschema.Draft202012Validator(load_schema("frame")).validate(by_id["m:1/frame"])

    sample = metrics.registry.get_sample_value
    assert sample("latticewatch_frames_out_of_domain_total") == 1
    assert sample("latticewatch_errors_total", {"kind": "out-of-domain"}) == 1
    counted = sum(s.value for f in metrics.registry.collect() if f.name == "latticewatch_particles"
                  for s in f.samples if s.name == "latticewatch_particles_total")
    in_domain = by_id["m:0/frame"]["particles"]
    assert counted == in_domain  # the film's "particle" is not counted

    snap = dashboard.state.snapshot()
    assert snap["totals"]["out_of_domain"] == 1 and snap["totals"]["particles"] == in_domain
    assert [s["out_of_domain"] for s in snap["series"]] == [False, True]
    assert dashboard.state.verdict["verdict"] == "unknown"

    archived = ArchiveReader(tmp_path / "archive" / "s").read("m:1")
    assert archived.reduced.lossless and archived.reduced.lossless_reason.startswith("model out of domain: ")
    np.testing.assert_array_equal(archived.pixels(), images[1])
