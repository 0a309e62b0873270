"""Lossless HDF5 compression of the archive's 1-D arrays: which filter, with which chunks.

The choice is stored per frame (the ``codec`` attribute) and only changes how the arrays are
compressed, never what they hold: any codec reads back the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from latticewatch.errors import ConfigError

__all__ = ["Codec", "load_filter_plugins"]

_CHUNK = 1 << 16  # elements: small chunks keep scale-offset's per-chunk range tight, and stay in cache
_SMALL = 4096  # arrays shorter than this are stored contiguous: chunk indexes would cost more


@dataclass(frozen=True)
class Codec:
    """Lossless HDF5 compression for the stored arrays.

    ``auto`` (default) uses HDF5's built-in *scale-offset* filter for integers — lossless at
    ``scaleoffset=0``, ~400 MB/s, readable by any HDF5 — and LZF + shuffle (built into h5py)
    for floats. ``gzip[:LEVEL]`` is the most portable and the slowest; ``zstd[:LEVEL]`` and
    ``bitshuffle`` (LZ4) are faster but need ``import hdf5plugin`` to read.

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
        """
        if data.size < _SMALL or self.name == "none" or data.dtype.kind not in "iuf":
            return {}
        n_chunks = -(-data.size // _CHUNK)
        # Equal chunks: the last one is padded by fewer than n_chunks elements.
        kw: dict[str, Any] = {"chunks": (-(-data.size // n_chunks),)}
        name = self.name
        if name in ("auto", "scaleoffset"):
            name = "scaleoffset" if data.dtype.kind in "iu" else "lzf"
        if name == "scaleoffset":
            # scaleoffset=0 is HDF5's lossless mode for integers (minimum bits per chunk); the
            # fill value pads the last chunk, so make it a value the data has.
            kw.update(scaleoffset=0, fillvalue=data[-1])
        elif name == "lzf":
            kw.update(compression="lzf", shuffle=True)
        elif name == "gzip":
            kw.update(compression="gzip", compression_opts=self.level or 1, shuffle=True)
        else:
            import hdf5plugin  # noqa: PLC0415 - optional, only for these codecs

            if name == "zstd":
                kw.update(shuffle=True, **hdf5plugin.Zstd(clevel=self.level or 1))
            else:
                kw.update(**hdf5plugin.Bitshuffle(cname="lz4"))
        return kw


def load_filter_plugins() -> None:
    """Make zstd / bitshuffle files readable when hdf5plugin is installed (it is optional).

    Examples
    --------
    >>> load_filter_plugins()  # a no-op without hdf5plugin
    """
    try:
        import hdf5plugin  # noqa: F401, PLC0415
    except ImportError:  # pragma: no cover - depends on the environment
        pass
