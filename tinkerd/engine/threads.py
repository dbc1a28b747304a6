"""Intra-op threads: one OpenMP pool per process, owned by the thread that runs the worker.

torch's OpenMP (libgomp) keeps a pool of worker threads for every thread that starts a
parallel region. Once a process holds more such threads than it has CPUs, libgomp stops
letting idle pool threads spin between regions, and every parallel op pays a futex wake-up
(~50 us). Measured on 2 cores with a main-thread pool and a scheduler-thread pool: small ops in
the scheduler thread ran 12x slower than in the main thread, and a decode step 2x slower. So
the server's other threads (the event loop, request handlers) run torch single-threaded and
never start a pool, and each in-process scheduler thread takes its `threads` for itself.
"""

import torch


def single_threaded() -> None:
    """This thread, and threads that run torch for the first time after this, use one
    intra-op thread (no OpenMP pool)."""
    torch.set_num_threads(1)


def take_threads(n: int) -> None:
    """In a worker's thread: `n` intra-op threads for this thread. torch sets a thread's
    OpenMP thread count at its first parallel op from a process-wide value, so that op runs
    here now; the caller may then set the process-wide value back (`single_threaded`)."""
    torch.set_num_threads(n)
    torch.ones(1 << 16).add_(1)  # a parallel region: this thread's count is fixed at n
