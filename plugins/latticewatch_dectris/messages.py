"""What a DECTRIS stream message means, whichever protocol version carried it.

The v1 and v2 parsers both turn one ZeroMQ message into one of `SeriesStart`, `EncodedImage` or
`SeriesEnd`, or raise `MessageError`. Images stay encoded until `EncodedImage.decode`, so a
frame the ledger already holds is never decompressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from latticewatch.errors import InputError
from latticewatch_dectris import codecs


class MessageError(InputError):
    """A message that cannot be understood; carries the series and frame when they were readable.

    Parameters
    ----------
    problem
        What is wrong, in words a user can act on.
    series, frame
        Identify the image when its first part could still be read, so the rejection keeps the
        frame's id.
    """

    def __init__(self, problem: str, series: int | None = None, frame: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.series = series
        self.frame = frame


@dataclass(frozen=True)
class SeriesStart:
    """The start of a series (v1 ``dheader-1.0``, v2 ``start``)."""

    series: int
    header_detail: str
    #: Detector settings worth carrying in frame metadata (JSON-serialisable).
    detector: dict[str, Any]
    #: Images the detector was armed for (``nimages × ntrigger`` / ``number_of_images``).
    expected_images: int | None = None
    #: Absolute time the series started, which image start times are relative to.
    collection_date: datetime | None = None
    flatfield: np.ndarray | None = None
    pixel_mask: np.ndarray | None = None
    countrate_table: np.ndarray | None = None
    appendix: Any = None


@dataclass(frozen=True)
class EncodedImage:
    """One image as received: identity, timing and the still-encoded pixels."""

    series: int
    frame: int
    shape: tuple[int, int]  # (rows, cols)
    dtype: np.dtype
    codec: str  # see `latticewatch_dectris.codecs`
    payload: bytes | memoryview
    #: Start of exposure relative to the series start, in seconds.
    start_time_s: float | None = None
    #: Absolute series start when the image message itself carries it (v2 ``series_date``).
    series_date: datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def decode(self) -> np.ndarray:
        """The pixels as a 2-D array in native byte order.

        Raises
        ------
        MessageError
            When the payload does not decode to the declared shape and type.
        """
        rows, cols = self.shape
        try:
            flat = codecs.decode(self.codec, self.payload, self.dtype, rows * cols)
        except codecs.DecodeError as err:
            raise MessageError(f"pixel data: {err}", self.series, self.frame) from err
        return flat.reshape(rows, cols).astype(self.dtype.newbyteorder("="), copy=False)


@dataclass(frozen=True)
class SeriesEnd:
    """The end of a series (v1 ``dseries_end-1.0``, v2 ``end``)."""

    series: int


#: What one message of either protocol version means.
Message = SeriesStart | EncodedImage | SeriesEnd


def check_pixels(rows: int, cols: int, max_pixels: int, series: int | None, frame: int | None) -> None:
    """Refuse images larger than the configured limit before anything is allocated for them."""
    if rows * cols > max_pixels:
        raise MessageError(
            f"image of {cols}×{rows} pixels exceeds max_pixels = {max_pixels}; "
            "raise the option if this detector is that large",
            series,
            frame,
        )
