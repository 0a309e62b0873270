"""Command-line side of the multislice simulator: ``latticewatch simulate``.

:func:`register` adds the subcommand to the main parser. abTEM is imported only when the command
runs, so ``latticewatch --help`` works without the ``[simulate]`` extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latticewatch.cli.common import command_line, error, exit_code, needs_extra
from latticewatch.errors import ConfigError

__all__ = ["register", "simulate_command"]

_HELP = """\
Simulate labelled HRTEM micrographs of nanoparticles on amorphous carbon with abTEM multislice,
for training and evaluating the segmenter and the classifier.

Particles: Au and Pd (fcc: octahedra, truncated octahedra, Wulff shapes, decahedra, icosahedra)
and CdSe (wurtzite, zinc blende), 2-10 nm. Classes (latticewatch.frame.CLASSES):
  no_stacking_fault  single crystal on zone axis (fcc <110>, wurtzite <11-20>), perfect
  stacking_fault     same zone axes with 1-2 planar defects edge-on (intrinsic/extrinsic fault,
                     twin; wurtzite I1/I2), or a decahedron/icosahedron along a twin-revealing axis
  misoriented        random orientation >= 5 deg from every low-index zone axis
  agglomeration      2-3 touching particles (one instance)
  empty              images without particles, and bare-carbon crops with a blob mask

Physics: amorphous carbon film (2-5 nm, 2.0 g/cm3, C-C >= 1.35 A, random sequential addition);
300 kV plane wave; abTEM potential (Lobato, infinite projection) sampled >= 2x finer than the
detector and <= 0.2 A, 2 A slices; objective lens with random defocus and residual aberrations
(A1, B2, A2, Cs, C5) and convergence envelope; focal spread as an incoherent sum over defoci;
detector pixel integration, MTF and Poisson noise (counting or integrating camera) at a dose of
200-5000 e/A2; pixel size 0.02-0.05 nm.

Output (names sim_000000, sim_000001, ...):
  DIR/images/NAME.mrc          float32 counts, pixel size in the header (voxel size, A)
  DIR/labels/NAME.png          particle mask 0/255 (pairs with the image by stem)
  DIR/instances/NAME.tif       uint16 instance map (0 = background)
  DIR/particles/NAME.json      conditions, particles: class, structure, size, zone axis,
                               defects with plane position, orientation, bbox
  DIR/crops/NAME_pNN.mrc (+ _mask.png), NAME_eNN (bare carbon), crops/index.csv
  DIR/dataset.json, DIR/README.md (dataset card with the distributions)

Image i depends only on (--seed, i): results do not depend on --workers, and an interrupted
run resumes where it stopped (complete images are skipped; files are written atomically). A
different seed or configuration in an existing DIR is refused; --n may grow.

Cost: about 15 s of CPU per 512x512 image on average (10-40 s: pixels above 0.04 nm need a
1536^2 grid instead of 1024^2, thick particles more slices); --workers uses one process per
core, so two workers on two cores make about 8-9 s per image.

Examples:
  latticewatch simulate --n 1000 --out sim --seed 1 --workers 2
  latticewatch simulate --n 200 --out sim-au --preset papers-au
  latticewatch simulate --n 50 --out sim-cdse --materials CdSe --classes stacking_fault,no_stacking_fault
"""

_PRESET_HELP = (
    "starting point: default, or papers-au (Au only, 0.02-0.03 nm/px, defocus within 100 nm of Gaussian "
    "focus, integrating camera, no empty images: the conditions of Groschner et al.'s Au data) (default: %(default)s)"
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to the ``latticewatch`` command.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="latticewatch")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["simulate", "--n", "2", "--out", "sim"])
    >>> args.func.__name__, args.n, args.workers
    ('simulate_command', 2, 1)
    """
    p = subparsers.add_parser(
        "simulate",
        help="simulate labelled HRTEM training data with abTEM multislice",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, required=True, help="number of images (may grow on a later run)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="dataset directory (created; resumed if it exists)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes, one per core (default: %(default)s)")
    p.add_argument("--preset", default="default", help=_PRESET_HELP)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: 512)")
    p.add_argument("--pixel-size-nm", type=float, nargs=2, metavar=("LO", "HI"),
                   help="pixel size range (default: 0.02 0.05)")
    p.add_argument("--materials", type=_csv, metavar="LIST",
                   help="comma-separated subset of Au,Pd,CdSe (equal weights)")
    p.add_argument("--classes", type=_csv, metavar="LIST",
                   help="comma-separated classes to produce (default weights kept); include 'empty' for images "
                        "without particles and bare-carbon crops")
    p.add_argument("--particle-size-nm", type=float, nargs=2, metavar=("LO", "HI"),
                   help="particle diameter range (default: 2 10)")
    p.add_argument("--particles-per-image", type=int, nargs=2, metavar=("LO", "HI"),
                   help="particles drawn per image (default: 1 5)")
    p.add_argument("--dose", type=float, nargs=2, metavar=("LO", "HI"),
                   help="dose range in e/A2, log-uniform (default: 200 5000)")
    p.add_argument("--defocus-nm", type=float, nargs=2, metavar=("LO", "HI"),
                   help="defocus range, positive = underfocus (default: -50 50)")
    p.add_argument("--carbon-thickness-nm", type=float, nargs=2, metavar=("LO", "HI"),
                   help="carbon film thickness range (default: 2 5)")
    p.add_argument("--max-sim-sampling", type=float, metavar="A",
                   help="coarsest multislice sampling in A (default: 0.2; 0.25 is ~2x faster at 0.05 nm/px)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    """Run ``latticewatch simulate``; returns the exit code."""
    with needs_extra("simulate", "simulate", "abTEM"):
        import abtem  # noqa: F401  (here, not at module level: `latticewatch --help` works without it)
        import ase  # noqa: F401
    from pydantic import ValidationError

    from latticewatch.training.simulate.config import PRESETS, SimulationConfig, preset_config
    from latticewatch.training.simulate.dataset import simulate_dataset

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; presets are {', '.join(PRESETS)}")
    overrides = {
        "size": args.size,
        "pixel_size_nm": args.pixel_size_nm,
        "particle_size_nm": args.particle_size_nm,
        "particles_per_image": args.particles_per_image,
        "dose_e_per_a2": args.dose,
        "defocus_nm": args.defocus_nm,
        "carbon_thickness_nm": args.carbon_thickness_nm,
        "max_sim_sampling_angstrom": args.max_sim_sampling,
    }
    if args.materials:
        overrides["materials"] = {m: 1.0 for m in args.materials}
    if args.classes:
        base = PRESETS[args.preset].get("classes") or SimulationConfig().classes
        default_weights = {**SimulationConfig().classes, **base}
        overrides["classes"] = {c: default_weights.get(c, 0.05 if c == "empty" else 0.25) for c in args.classes}
    if args.n < 0 or args.workers < 1:
        raise ConfigError("--n must be >= 0 and --workers >= 1")
    try:
        config = preset_config(args.preset, **overrides)
    except (ValidationError, ValueError) as err:  # the simulation config names the option's key
        raise ConfigError(str(err)) from None
    run = simulate_dataset(args.out, args.n, args.seed, config, workers=args.workers, preset=args.preset,
                           command=command_line(args))
    summary = {
        "out": str(run.out),
        "simulated": len(run.simulated),
        "skipped": len(run.skipped),
        "failed": {str(k): v for k, v in run.failed.items()},
        "seconds": round(run.seconds, 2),
        "seconds_per_image": None if run.seconds_per_image is None else round(run.seconds_per_image, 2),
        "workers": run.workers,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        per = ("" if run.seconds_per_image is None
               else f" ({run.seconds_per_image:.1f} s per image with {run.workers} worker(s))")
        print(f"{len(run.simulated)} image(s) simulated, {len(run.skipped)} already complete, {len(run.failed)} failed "
              f"in {run.seconds:.1f} s{per}; dataset card: {run.out / 'README.md'}")
        for index, problem in sorted(run.failed.items()):
            error(f"image {index}: {problem}")
    return exit_code(run.failed)
