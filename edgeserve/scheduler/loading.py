"""Pieces of a load the scheduler runs: allocation then freeze on the step thread, the
progress bar, the scheme a load reports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeserve.arch.spec import ModelSpec
from edgeserve.loader import LoadContext, LoadReport, Prepared, Sources, prepare


def prepare_frozen(path: Path, spec: ModelSpec, ctx: LoadContext, owner: str,
                    report: LoadReport, sources: Sources, host_only: frozenset[str]
                    ) -> Prepared:
    """prepare, then freeze the pool before the step thread runs another step: a
    compaction for KV in between would move the new units under the views the fill
    writes through (the caller thaws it once the fill is done)."""
    prepared = prepare(path, spec, ctx, owner, report, sources, host_only)
    ctx.pool.freeze()
    return prepared


@contextlib.contextmanager
def progress(model_id: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr, shown only if the load takes over a second."""
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {model_id}", delay=1.0,
              leave=False) as bar:
        yield bar.update


def load_scheme(schemes: dict[str, str]) -> str | None:
    """A load's scheme: int8, int4, mixed, or None for float weights."""
    found = set(schemes.values())
    return (found.pop() if len(found) == 1 else "mixed") if found else None
