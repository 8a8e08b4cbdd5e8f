"""Hand an experiment's runs to Dask distributed: sweeps beyond one machine.

Why Dask distributed: it installs with pip alone (`pip install distributed`, the `cluster`
extra), needs no daemon or cluster manager, and scales the same code from
`distributed.LocalCluster` (processes on this machine: what the tests run against) to many
machines with its CLI (`dask scheduler` on one host, `dask worker tcp://HOST:8786
--nthreads 1` on each; `dask-scheduler` / `dask-worker` in older releases) or to a SLURM/PBS allocation through dask-jobqueue. A task whose
worker dies is rescheduled by the scheduler on another worker; that is all the fault
tolerance a run needs, because a run resumes from its own per-epoch checkpoint.

How a run goes through it: each pending run is one task, `runner.run_one(run_dir, ...)`, with
`run_dir` an absolute path, so every worker must see the experiment's output folder (and the
data) at the same path (a shared file system). A task started again after its worker died
finds `last.pt` in that folder and continues from the last finished epoch, with the same
result as an uninterrupted run (the trainer's exact resume). Runs already done are never
submitted (the runner's skip logic, unchanged). One run per worker thread: start workers
with `--nthreads 1` and give each run its torch threads with `--threads`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

# Retries of a task that raised (run_one reports a failing run rather than raising; this
# covers what escapes it, e.g. a worker out of memory). Worker deaths are counted
# separately by the scheduler (`distributed.scheduler.allowed-failures`, default 3).
RETRIES = 2


def _client(scheduler: Optional[str], workers: int):
    """A client of `scheduler` (an address such as tcp://host:8786), or of a LocalCluster of
    `workers` single-threaded worker processes started here (closed by the caller)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("--engine dask needs Dask distributed: pip install distributed "
                           "(or pip install -e .[cluster])") from None
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster


def run_all(tasks: List[Tuple[str, Callable[..., Dict[str, Any]], tuple]],
            record: Callable[[str, Dict[str, Any]], None], scheduler: Optional[str] = None,
            workers: int = 1) -> None:
    """Submit every (run id, function, args) task and call `record(run id, outcome)` as each
    finishes, in finishing order. A task that still fails after the scheduler's retries is
    recorded as a failed run (its folder keeps the last checkpoint: the next start resumes)."""
    client, cluster = _client(scheduler, workers)
    futures: Dict[Any, str] = {}
    try:
        for run_id, fn, args in tasks:
            # key = the run id: a resubmitted run (same config) is the same task.
            fut = client.submit(fn, *args, key=f"cdsr-run-{run_id}", pure=False, retries=RETRIES)
            futures[fut] = run_id
        from distributed import as_completed

        for fut in as_completed(list(futures)):
            run_id = futures[fut]
            try:
                outcome = fut.result()
            except Exception as e:  # noqa: BLE001 - a task the cluster gave up on (e.g. KilledWorker)
                outcome = {"status": "failed", "error": f"dask: {type(e).__name__}: {e}"}
            record(run_id, outcome)
    except BaseException:
        # Interrupted: the runs in flight keep their last epoch checkpoint and resume on the
        # next start; nothing queued should keep the cluster busy.
        client.cancel(list(futures))
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
