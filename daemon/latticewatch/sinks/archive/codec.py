"""Lossless HDF5 compression of the archive's 1-D arrays: which filter, with which chunks.

The choice is stored per frame (the ``codec`` attribute) and only changes how the arrays are
compressed, never what they hold: any codec reads back the same values. ``auto`` and ``zstd``
use the Zstandard filter of hdf5plugin (a dependency); other programs read those files after
``import hdf5plugin`` (or with HDF5_PLUGIN_PATH set to its plugins).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from latticewatch.errors import ConfigError

__all__ = ["Codec", "load_filter_plugins"]

_CHUNK = 1 << 16  # elements: small chunks keep scale-offset's per-chunk range tight, and stay in cache
# zstd level of ``auto``: HRTEM counts are mostly noise, which only the entropy stage shrinks; higher
# levels search for matches that noise does not have (level 9 gained < 0.1 % at a third of the speed).
_AUTO_ZSTD_LEVEL = 1
_SMALL = 4096  # arrays shorter than this are stored contiguous: chunk indexes would cost more


@dataclass(frozen=True)
class Codec:
    """Lossless HDF5 compression for the stored arrays.

    ``auto`` (default) puts byte-shuffle + Zstandard (level 1) on integer arrays — the exact
    pixels' split planes included, where it entropy-codes the noisy low bytes and the smooth high
    byte that a general-purpose compressor of the raw frame cannot separate — and LZF + shuffle
    (built into h5py) on floats. ``scaleoffset`` is HDF5's built-in minimum-bits filter (readable
    by any HDF5); ``gzip[:LEVEL]`` is the most portable and the slowest; ``auto``, ``zstd[:LEVEL]``
    and ``bitshuffle`` (LZ4) need ``import hdf5plugin`` to read.

    Examples
    --------
    >>> Codec.parse("gzip:4").level
    4
    """

    name: str = "auto"
    level: int | None = None

    _NAMES = ("auto", "none", "scaleoffset", "gzip", "lzf", "zstd", "bitshuffle")

    def __post_init__(self) -> None:
        if self.name not in self._NAMES:
            raise ConfigError(f"unknown archive codec {self.name!r}: use one of {', '.join(self._NAMES)}")

    @classmethod
    def parse(cls, text: str | Codec) -> Codec:
        """A codec from its text form ``NAME[:LEVEL]`` (a `Codec` is returned as is).

        Examples
        --------
        >>> str(Codec.parse("ZSTD:3"))
        'zstd:3'
        """
        if isinstance(text, Codec):
            return text
        name, _, level = str(text).strip().lower().partition(":")
        try:
            number = int(level) if level else None
        except ValueError:
            raise ConfigError(f"bad archive codec {text!r}: the level must be a whole number (NAME:LEVEL)") from None
        return cls(name, number)

    def __str__(self) -> str:
        return self.name if self.level is None else f"{self.name}:{self.level}"

    def dataset_kwargs(self, data: np.ndarray) -> dict[str, Any]:
        """``create_dataset`` keyword arguments for one 1-D array.

        Examples
        --------
        >>> Codec("gzip").dataset_kwargs(np.zeros(10_000, np.float32))["compression"]
        'gzip'
        >>> Codec().dataset_kwargs(np.zeros(10_000, np.uint8))["compression"]  # the Zstandard filter's id
        32015
        """
        if data.size < _SMALL or self.name == "none" or data.dtype.kind not in "iuf":
            return {}
        n_chunks = -(-data.size // _CHUNK)
        # Equal chunks: the last one is padded by fewer than n_chunks elements.
        kw: dict[str, Any] = {"chunks": (-(-data.size // n_chunks),)}
        name, level = self.name, self.level
        if name == "auto":
            name, level = ("zstd", _AUTO_ZSTD_LEVEL) if data.dtype.kind in "iu" else ("lzf", None)
        elif name == "scaleoffset" and data.dtype.kind == "f":
            name = "lzf"
        if name == "scaleoffset":
            # scaleoffset=0 is HDF5's lossless mode for integers (minimum bits per chunk); the
            # fill value pads the last chunk, so make it a value the data has.
            kw.update(scaleoffset=0, fillvalue=data[-1])
        elif name == "lzf":
            kw.update(compression="lzf", shuffle=True)
        elif name == "gzip":
            kw.update(compression="gzip", compression_opts=self.level or 1, shuffle=True)
        elif name == "zstd":
            hdf5plugin = load_filter_plugins()
            # shuffle is a no-op on bytes (the split planes) and groups the bytes of wider words
            kw.update(shuffle=data.dtype.itemsize > 1, **hdf5plugin.Zstd(clevel=level or 1))
        else:
            kw.update(**load_filter_plugins().Bitshuffle(cname="lz4"))
        return kw


def load_filter_plugins() -> ModuleType:
    """Register hdf5plugin's filters (Zstandard, bitshuffle) with HDF5 and return the module.

    Importing hdf5plugin registers them; call this before opening or writing an archive file.

    Examples
    --------
    >>> load_filter_plugins().ZSTD_ID
    32015
    """
    import hdf5plugin  # noqa: PLC0415 - registration costs an import; readers of plain files skip it

    return hdf5plugin
