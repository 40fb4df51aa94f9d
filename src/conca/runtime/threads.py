"""Thread pools: cap torch's and the BLAS/OpenMP pools' threads for a run."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def thread_limits(n: int):
    """Cap torch's and the BLAS/OpenMP pools' threads for the run (0: leave them), then restore.

    On a small machine shared with other jobs, multi-threaded tiny matrix products mostly wait on
    each other: measured on 2 busy cores, one thread made MLP steps and probe fits ~5x faster."""
    if not n:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn
    except ImportError:  # pragma: no cover
        threadpool_limits = lambda n: contextlib.nullcontext()  # noqa: E731

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)
