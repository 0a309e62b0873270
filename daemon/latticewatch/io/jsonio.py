"""The one JSON encoder for what latticewatch writes (reports, events, archive attributes, data sets).

numpy scalars and arrays, datetimes and paths become their natural JSON; anything else is a bug
and raises ``TypeError`` instead of being written as an unreadable ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any

import numpy as np


def json_default(value: Any) -> Any:
    """``default=`` for `json.dumps`.

    Examples
    --------
    >>> json.dumps({"n": np.int64(3), "a": np.arange(2)}, default=json_default)
    '{"n": 3, "a": [0, 1]}'
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` with `json_default`."""
    return json.dumps(value, default=json_default, **kwargs)


def parse_timestamp(text: str, formats: Sequence[str] = ()) -> datetime:
    """A timestamp: ISO 8601 by default, else in the first of the `strptime` ``formats`` that fits.

    ISO 8601 is what latticewatch writes and what stream headers and detector configurations carry
    ('Z' for UTC included). Files with their own spelling (SerialEM's ``04-Dec-19  10:38:23``,
    TIFF's ``2024:06:01 10:38:23`` …) pass their ``formats``; runs of whitespace then count as one
    space, since writers pad the fields.

    Parameters
    ----------
    text
        The timestamp.
    formats
        `datetime.strptime` formats to try, in order, instead of ISO 8601.

    Returns
    -------
    datetime
        Timezone-aware when the text has an offset, naive otherwise.

    Raises
    ------
    TypeError
        ``text`` is not a string (e.g. a number in a JSON header).
    ValueError
        ``text`` is not a timestamp of the expected form.

    Examples
    --------
    >>> parse_timestamp("2026-12-02T10:00:00Z").isoformat()
    '2026-12-02T10:00:00+00:00'
    >>> parse_timestamp("04-Dec-19  10:38:23", ("%d-%b-%y %H:%M:%S",)).isoformat()
    '2019-12-04T10:38:23'
    """
    if not isinstance(text, str):
        raise TypeError(f"a timestamp must be a string, not {type(text).__name__}")
    if not formats:
        return datetime.fromisoformat(text.strip())  # Python ≥ 3.11 reads 'Z' and the other ISO forms
    collapsed = " ".join(text.split())
    for fmt in formats:
        try:
            return datetime.strptime(collapsed, fmt)
        except ValueError:
            continue
    raise ValueError(f"{text!r} matches none of the timestamp formats {formats}")
