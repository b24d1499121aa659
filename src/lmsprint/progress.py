"""Progress bars that keep an error one line: a bar on screen when the work fails is wiped, not left above it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(*, enabled: bool, **kwargs: Any) -> Iterator[tqdm]:
    """A tqdm bar (``kwargs`` as tqdm takes them), closed on leaving; erased from the screen if the work inside
    raises (an error, Ctrl-C), so that the terminal shows the error line alone."""
    bar = tqdm(disable=not enabled, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
