"""The archive: every analysed frame kept in HDF5, the valuable classes bit-exact, the rest reduced.

Following Sadre et al. (2021), the class that matters (particles) and a margin around it are
stored exactly and the low-value class (background, contamination) is run-length reduced by a
policy; uncertain frames are kept whole. Files are written atomically, one session at a time,
and read back by `ArchiveReader` or ``latticewatch restore``. The README section "Archive: data
reduction, layout, restore" is the user's description, including the on-disk layout.

Modules, in the order a frame goes through them:

``rules``    when a frame is kept whole and lossless (`UncertaintyRule`)
``reduce``   pure array code: a frame to the arrays the archive stores (the low-value policies) and back
``runs``     run-length coding and the square dilation of the margin
``bitpack``  small integer codes and exact integer pixels packed into bytes
``codec``    lossless HDF5 compression of the stored arrays
``layout``   the HDF5 layout (format version 2): encode and decode one frame, consolidate volumes
``session``  one session's directory: lock, segments, volumes, recovery after a crash
``writer``   `ArchiveWriter`: durable writes, rotation, pausing on a full or failing disk
``reader``   `ArchiveReader`: list and read the frames of a file, session or root
``stats``    `archive_stats`: compression ratio and bytes by component
``bench``    ``latticewatch bench --archive``
"""

from latticewatch.sinks.archive.codec import Codec
from latticewatch.sinks.archive.layout import ArchivedFrame, decode_frame_file, encode_frame_file, frame_key
from latticewatch.sinks.archive.reader import ArchiveReader, IndexEntry
from latticewatch.sinks.archive.rules import UncertaintyRule
from latticewatch.sinks.archive.session import ArchiveError
from latticewatch.sinks.archive.stats import archive_stats
from latticewatch.sinks.archive.writer import ArchiveReceipt, ArchiveUnavailable, ArchiveWriter

__all__ = [
    "ArchiveError",
    "ArchiveReader",
    "ArchiveReceipt",
    "ArchiveUnavailable",
    "ArchiveWriter",
    "ArchivedFrame",
    "Codec",
    "IndexEntry",
    "UncertaintyRule",
    "archive_stats",
    "decode_frame_file",
    "encode_frame_file",
    "frame_key",
]
