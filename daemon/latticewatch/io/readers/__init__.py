"""Read micrograph files into `Frame` objects: MRC, TIFF, DM3/DM4, SER, Berkeley EMD and PNG.

Every format is decoded by its established library (mrcfile, tifffile with a Pillow fallback,
ncempy, Pillow); this package only maps what they return onto `Frame`, checks it, and turns every
failure into one `ReadError` that names the file, the section and the problem.

Layout
------
``dispatch``  the suffix registry, `read_frames` and `count_sections`
``core``      `ReadError`, the limits, and the checks every frame passes on its way out
``mrc``       MRC files and stacks (mrcfile), with the strict/permissive header rules
``tiff``      TIFF (tifffile, Pillow for what tifffile needs imagecodecs for)
``ncem``      DM3/DM4, SER and Berkeley EMD (ncempy)
``image``     PNG (Pillow)

Rules shared by all formats
---------------------------
* One `Frame` per 2-D image: a stack (MRC ``nz > 1``, multi-page TIFF, DM/EMD 3-D data, a SER
  series) gives one frame per section, in file order. ``frame_id`` is ``<path>#<section>``
  (0-based) when the file declares more than one section and ``<path>`` otherwise; ``<path>`` is
  the path exactly as the caller gave it.
* Pixels keep the file's dtype (only the byte order is made native). Colour images are refused
  unless ``permissive``; then they are converted to grey (Rec. 601 luma, rounded back to the
  original dtype) and a warning is added to ``meta["warnings"]``.
* Declared sizes are checked before any pixel is read: more than ``max_pixels`` or a side shorter
  than `latticewatch.frame.MIN_SIDE_PX` is refused in both modes. (SER is the exception: ncempy
  gives the shape only together with the pixels, and the read is bounded by the file's real size.)
* Float frames with NaN/±Inf pixels: strict raises, naming how many; permissive replaces them by
  the median of the finite pixels and records ``meta["nonfinite_pixels"]``. A frame with no
  finite pixel is refused in both modes.
* ``pixel_size_nm`` comes from the file only (calibration files are the pipeline's business) and
  is ``None`` when the file does not say or says something implausible (outside
  `PLAUSIBLE_PIXEL_NM`); ``meta["pixel_size_source"]`` or ``meta["pixel_size_note"]`` tells why.

  - MRC: ``voxel_size.x`` (Å) / 10. A voxel size of 0 is "unset" (MRC2014). Exactly 1.0 Å (cell
    edge == sample count) is IMOD's default when no pixel size was given, so it is also treated
    as unknown: a real calibration is never exactly 1.000 Å, while taking the default at face
    value would silently give wrong nm-sizes instead of falling back to the calibration files.
  - TIFF: FEI/Thermo ``[Scan] PixelWidth`` (m), then ImageJ ``unit`` + XResolution, then
    XResolution with ResolutionUnit cm/inch only when that gives a pixel below 1 µm (anything
    coarser is a print/display DPI such as 72 dpi, not a sampling).
  - DM3/DM4, SER, EMD: ncempy's per-axis scale and unit (Å, nm, µm, m … converted to nm).
  - PNG: always ``None``.
* ``acquired_at``: timezone-aware (UTC) when the format says UTC (DM "Acquisition Time (OS)",
  SER tag time), naive local time when the format stores local time (TIFF DateTime, TIA's EMI),
  ``None`` otherwise (MRC, PNG, EMD).
* Strict by default. ``permissive=True`` lets mrcfile guess through header inconsistencies, reads
  the complete sections of a truncated MRC stack, converts colour and replaces non-finite pixels;
  every guess is logged under ``latticewatch.io.readers`` and listed in ``meta["warnings"]``.
* Filesystem errors (missing file, permission, EIO) propagate as `OSError` so the caller can retry;
  everything about the *content* is a `ReadError`.
"""

from latticewatch.io.readers.core import DEFAULT_MAX_PIXELS, PLAUSIBLE_PIXEL_NM, ReadError
from latticewatch.io.readers.dispatch import SUPPORTED_SUFFIXES, count_sections, read_frames
from latticewatch.io.readers.mrc import MRC_SUFFIXES, MrcLayout, mrc_layout

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MRC_SUFFIXES",
    "MrcLayout",
    "PLAUSIBLE_PIXEL_NM",
    "SUPPORTED_SUFFIXES",
    "ReadError",
    "count_sections",
    "mrc_layout",
    "read_frames",
]
