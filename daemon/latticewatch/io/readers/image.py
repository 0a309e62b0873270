"""Plain images (Pillow): PNG, greyscale; colour and palette images only when permissive."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np

from latticewatch.io.readers.core import Plane, ReadContext, jsonable

PNG_SUFFIXES = (".png",)


@contextmanager
def png_planes(ctx: ReadContext) -> Iterator[list[Plane]]:
    """The frame(s) of a PNG (more than one for an animated PNG); palette colour only when permissive.

    Examples
    --------
    >>> import os, tempfile
    >>> from PIL import Image
    >>> from latticewatch.io.readers.core import DEFAULT_MAX_PIXELS
    >>> path = os.path.join(tempfile.mkdtemp(), "grey.png")
    >>> Image.fromarray(np.zeros((24, 40), np.uint8)).save(path)
    >>> with png_planes(ReadContext(path, permissive=False, max_pixels=DEFAULT_MAX_PIXELS)) as planes:
    ...     planes[0].shape
    (24, 40)
    """
    from PIL import Image

    try:
        # formats= keeps Pillow from trying every plugin on a mislabelled file (EPS would run
        # Ghostscript): a .png must be a PNG
        img = Image.open(ctx.path, formats=["PNG"])
    except Image.DecompressionBombError as exc:
        raise ctx.error(f"image too large for Pillow's decompression-bomb guard: {exc}") from exc
    with img:
        cols, rows = img.size
        n = int(getattr(img, "n_frames", 1))
        ctx.meta.update(
            format="png",
            png_mode=img.mode,
            png_info=jsonable(
                {k: v for k, v in img.info.items() if isinstance(v, (str, int, float, tuple))}
            ),
        )

        def load(k: int, plane: Plane) -> np.ndarray:
            img.seek(k)
            frame = img
            if img.mode in ("P", "PA"):
                if not ctx.permissive:
                    raise ctx.error("palette-colour PNG; expected greyscale (permissive=True converts)")
                frame = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
            return np.array(frame)

        planes = [Plane(shape=(rows, cols), load=partial(load, k)) for k in range(n)]
        ctx.n_declared = n
        yield planes
