"""A progress bar on a terminal for the long commands (sweep, keys rotate, import).

tqdm draws it when it is installed (the ``progress`` extra) and stderr is a
terminal; otherwise nothing is drawn and the commands print their summary as
usual. The image installs neither tqdm nor a terminal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Progress = Callable[[int, int], None]
"""Called with (done, total)."""


@contextlib.contextmanager
def progress_bar(what: str, unit: str) -> Iterator[Progress]:
    if not sys.stderr.isatty():
        yield _quiet
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield _quiet
        return
    bar = tqdm(unit=unit, desc=what)

    def show(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield show
    finally:
        bar.close()


def _quiet(done: int, total: int) -> None:
    pass
