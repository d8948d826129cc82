"""Progress bars that a build can switch off.

Every bar of or_core comes from :func:`progress_bar`: ``tqdm.auto`` (a widget in Jupyter, text
elsewhere), off when the caller says so or when the environment variable ``TQDM_DISABLE`` is set
(the book's build sets it: a bar is noise on a static page). tqdm reads ``TQDM_DISABLE`` only as
the default of ``disable``, and its notebook bar always passes ``disable`` explicitly, so in a
Jupyter kernel the variable alone silences nothing, and without ipywidgets the bar prints a
warning in its place; hence the check here. Without ipywidgets ``tqdm.auto`` falls back to the
text bar, and the warning it prints on import about that is left out.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    from tqdm.auto import tqdm

#: Values of ``TQDM_DISABLE`` that leave bars on.
_OFF_VALUES = {"", "0", "false", "no", "off"}


def disabled_by_environment() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no progress bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in _OFF_VALUES


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A ``tqdm.auto`` bar over ``iterable`` (keywords as tqdm's), shown only when ``enabled``
    and not switched off by ``TQDM_DISABLE``."""
    return tqdm(iterable, disable=not enabled or disabled_by_environment(), **kwargs)
