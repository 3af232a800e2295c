"""Ordered parallel map over work items, in this process, a local process pool or Ray.

The dataset builders and the batch reconstruction hand their work items (sample indices,
session keys) to an executor and consume the results in submission order::

    with make_executor("ray", workers=8, initializer=setup, initargs=(spec,)) as ex:
        for result in ex.map(work, items):
            ...

Kinds:

- ``local``: with one worker, the items run in this process (``initializer`` is not
  called: the caller has its state at hand, see :attr:`Executor.in_process`); with more, a
  spawned :class:`~concurrent.futures.ProcessPoolExecutor` whose workers each get an equal
  share of the CPUs (thread-count variables set to it) and end when this process is gone.
- ``ray``: ``ray.init(address=...)`` reaches a cluster (``address`` or the ``RAY_ADDRESS``
  environment variable); without one a private local Ray instance with ``workers`` CPUs is
  started (and stopped on :meth:`Executor.close`). Every item is a ``@ray.remote`` task
  with ``num_cpus=1`` and one BLAS / OpenMP / torch thread. Ray is an optional
  dependency (``pip install 'faceps[ray]'``).

In both parallel kinds ``initializer(*initargs)`` runs once in each worker process before
its first item (the arguments are sent once), and ``fn`` and ``initializer`` must be
module-level functions (sent by reference). At most ``ahead`` items are in flight
(default :data:`AHEAD_PER_WORKER` per worker), so memory stays bounded however many items
there are. Results come in the order of the items whatever the kind or the worker count;
their values are the same when ``fn`` does not depend on the thread counts of native
libraries (Ray tasks use one thread, local pool workers their CPU share).

An exception raised by ``fn`` for an item, or a worker that dies while the item is in
flight, raises :class:`TaskError` naming the item (the original exception is its
``__cause__``); with ``return_failures=True`` the map yields a :class:`TaskFailure` in
the item's place instead and goes on (a broken process pool is replaced, the items that
were in flight after the failed one are submitted again). ``KeyboardInterrupt`` is never
wrapped.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from faceps.core.errors import ConfigError, FacepsError
from faceps.core.memory import retain_freed_memory

log = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "AHEAD_PER_WORKER", "RAY_INSTALL_HINT", "TaskError", "TaskFailure",
           "Executor", "make_executor", "check_executor", "available_cpus", "thread_env",
           "add_arguments"]

#: the executor kinds of :func:`make_executor`
EXECUTORS = ("local", "ray")
#: items each worker may have in flight ahead of the consumer by default
AHEAD_PER_WORKER = 2
#: variables that size the BLAS / OpenMP thread pools of processes started with them
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS")
RAY_INSTALL_HINT = ("--executor ray needs Ray: install it with "
                    "pip install 'faceps[ray]' (or pip install 'ray>=2.9')")


class TaskError(FacepsError):
    """A work item failed: its function raised, or the worker running it died.

    Attributes:
        item: the work item.
        worker_lost: True when the worker process died (the item itself may be innocent:
            another item of the same worker may have killed it).
    """

    def __init__(self, message: str, *, item: Any = None, worker_lost: bool = False):
        super().__init__(message)
        self.item = item
        self.worker_lost = worker_lost


@dataclass
class TaskFailure:
    """What :meth:`Executor.map` yields for a failed item with ``return_failures=True``.

    Attributes:
        item: the work item.
        error: the exception (the function's own, or the executor's for a lost worker).
        worker_lost: True when the worker process died.
    """

    item: Any
    error: BaseException
    worker_lost: bool = False

    def as_error(self) -> TaskError:
        """The :class:`TaskError` that ``return_failures=False`` raises for it."""
        return _task_error(self.item, self.error, self.worker_lost)


def _task_error(item: Any, exc: BaseException, worker_lost: bool) -> TaskError:
    what = ("the worker running it stopped unexpectedly" if worker_lost
            else f"{type(exc).__name__}")
    text = str(exc).strip() or repr(exc)
    err = TaskError(f"work item {item!r} failed: {what}: {text}", item=item,
                    worker_lost=worker_lost)
    err.__cause__ = exc
    return err


# ------------------------------------------------------------------ helpers
def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def thread_env(threads: int) -> Iterator[None]:
    """Thread-count variables for processes started inside the block (BLAS/OpenMP read
    them when they load)."""
    old = {k: os.environ.get(k) for k in THREAD_VARS}
    try:
        for k in THREAD_VARS:
            os.environ[k] = str(threads)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _with_cpus(cpus: Sequence[int], fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` with this process's CPU affinity restricted to ``cpus``, then
    restore it. Thread pools that size themselves from the affinity mask when they start
    (open3d's TBB, Embree) start small; the scheduler can still move the process later
    (pinning would tie it to a core that another program is using)."""
    everything = available_cpus()
    restrict = hasattr(os, "sched_setaffinity") and 0 < len(cpus) < len(everything)
    if restrict:
        try:
            os.sched_setaffinity(0, list(cpus))
        except OSError:
            restrict = False
    try:
        return fn(*args)
    finally:
        if restrict:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, everything)


def _exit_with_parent(parent: int, period: float = 1.0) -> None:
    """End this worker when the process that started it is gone (killed with SIGKILL, the
    parent cannot stop its pool; the worker would otherwise wait for tasks forever)."""
    while True:
        time.sleep(period)
        if os.getppid() != parent:
            os._exit(1)


def _pool_bootstrap(initializer: Callable[..., Any] | None, initargs: tuple,
                    cpus: list[list[int]], counter: Any) -> None:
    """Process-pool initializer: watch the parent, then run the caller's initializer with
    the CPU affinity restricted to this worker's share (see :func:`_with_cpus`), with the
    allocator policy of the command line (:func:`faceps.core.memory.retain_freed_memory`)."""
    retain_freed_memory()
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True,
                     name="faceps-parent-watch").start()
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    if initializer is not None:
        _with_cpus(cpus[slot % len(cpus)], initializer, *initargs)


# ------------------------------------------------------------------ executors
class Executor(abc.ABC):
    """Ordered, bounded-look-ahead map over work items (made by :func:`make_executor`).

    Attributes:
        kind: ``local`` or ``ray``.
        workers: items processed at the same time.
        in_process: True when items run in this process (``local`` with one worker):
            ``initializer`` is not called and ``fn`` may be any callable.
    """

    kind = "local"

    def __init__(self, workers: int):
        self.workers = int(workers)

    @property
    def in_process(self) -> bool:
        return False

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], *, ahead: int | None = None,
            return_failures: bool = False) -> Iterator[Any]:
        """Yield ``fn(item)`` for every item, in the order of ``items``.

        Args:
            fn: the work function (module-level unless :attr:`in_process`).
            items: the work items (consumed lazily).
            ahead: items in flight at most (default ``AHEAD_PER_WORKER * workers``).
            return_failures: yield a :class:`TaskFailure` for a failed item instead of
                raising :class:`TaskError`.

        Raises:
            TaskError: an item failed (without ``return_failures``).
        """

    def close(self) -> None:
        """Stop the workers (idempotent). Nothing to stop by default (in process)."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ahead(self, ahead: int | None) -> int:
        n = AHEAD_PER_WORKER * self.workers if ahead is None else int(ahead)
        if n < 1:
            raise ConfigError(f"ahead must be >= 1; got {ahead!r}")
        return n


class _InProcess(Executor):
    """Items run one after the other in this process."""

    @property
    def in_process(self) -> bool:
        return True

    def map(self, fn, items, *, ahead=None, return_failures=False):
        self._ahead(ahead)
        for item in items:
            try:
                result = fn(item)
            except Exception as exc:  # noqa: BLE001 - reported with the item
                if not return_failures:
                    raise _task_error(item, exc, False) from exc
                result = TaskFailure(item, exc)
            yield result


class _ProcessPool(Executor):
    """A spawned process pool; each worker gets ``len(cpus) // workers`` CPUs and as many
    BLAS/OpenMP threads (``threads`` overrides the count)."""

    def __init__(self, workers: int, initializer: Callable[..., Any] | None, initargs: tuple,
                 threads: int | None):
        super().__init__(workers)
        cpus = available_cpus()
        per = max(1, len(cpus) // workers)
        self._shares = [[cpus[(k * per + j) % len(cpus)] for j in range(per)]
                        for k in range(workers)]
        self._threads = per if threads is None else int(threads)
        self._init = (initializer, tuple(initargs))
        self._ctx = mp.get_context("spawn")
        self._pools: list[Any] = []

    def _new_pool(self) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        counter = self._ctx.Value("i", 0)
        with thread_env(self._threads):
            pool = ProcessPoolExecutor(self.workers, mp_context=self._ctx,
                                       initializer=_pool_bootstrap,
                                       initargs=(*self._init, self._shares, counter))
        self._pools.append(pool)
        return pool

    def map(self, fn, items, *, ahead=None, return_failures=False):
        from concurrent.futures.process import BrokenProcessPool

        width = self._ahead(ahead)
        todo = iter(items)
        retry: deque[Any] = deque()  # items to submit again after a broken pool
        pending: deque[tuple[Any, Any]] = deque()
        pool = self._pools[-1] if self._pools else self._new_pool()

        def next_item() -> tuple[bool, Any]:
            if retry:
                return True, retry.popleft()
            for item in todo:
                return True, item
            return False, None

        while True:
            try:
                while len(pending) < width:
                    more, item = next_item()
                    if not more:
                        break
                    try:
                        pending.append((item, pool.submit(fn, item)))
                    except BrokenProcessPool:
                        retry.appendleft(item)
                        raise
                if not pending:
                    return
                item, future = pending[0]
                failed: Exception | None = None
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported with the item
                    failed = exc
                pending.popleft()
                if failed is not None:
                    if not return_failures:
                        raise _task_error(item, failed, False) from failed
                    result = TaskFailure(item, failed)
            except BrokenProcessPool as exc:
                # the oldest item in flight is reported; the others are submitted again
                item = pending.popleft()[0] if pending else retry.popleft()
                log.warning("a worker process died while %r was in flight", item)
                retry.extendleft(reversed([i for i, _ in pending]))
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = self._new_pool()
                if not return_failures:
                    raise _task_error(item, exc, True) from exc
                result = TaskFailure(item, exc, worker_lost=True)
            yield result

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()


# ------------------------------------------------------------------ Ray
#: per-process state of Ray workers: the key of the initializer that ran last
_RAY_STATE: dict[str, Any] = {}


def _ray_task(key: str, init: list[Any], fn: Callable[[Any], Any], item: Any) -> Any:
    """Body of every Ray task: one thread for BLAS/OpenMP/torch, the initializer once per
    worker process and executor (``init`` is ``[initializer, ref]``, the reference to
    the arguments is resolved only then), then ``fn(item)``."""
    if _RAY_STATE.get("key") != key:
        retain_freed_memory()
        for k in THREAD_VARS:
            os.environ[k] = "1"
        with contextlib.suppress(ImportError):
            import torch

            torch.set_num_threads(1)
        initializer, ref = init
        if initializer is not None:
            import ray

            initargs = ray.get(ref)
            cpus = available_cpus()
            _with_cpus([cpus[os.getpid() % len(cpus)]], initializer, *initargs)
        _RAY_STATE["key"] = key
    return fn(item)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_INSTALL_HINT) from None
    return ray


class _Ray(Executor):
    """Tasks on a Ray cluster or a private local Ray instance."""

    kind = "ray"

    def __init__(self, workers: int, address: str | None, initializer: Callable[..., Any] | None,
                 initargs: tuple, ray_init: dict | None):
        ray = _import_ray()
        super().__init__(workers)
        self._ray = ray
        self._owner = False
        address = address or os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            options: dict[str, Any] = {
                "include_dashboard": False, "configure_logging": False,
                "log_to_driver": False, "ignore_reinit_error": True,
                "runtime_env": {"env_vars": {k: "1" for k in THREAD_VARS}},
                **(ray_init or {})}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(address="local", num_cpus=self.workers, **options)
            self._owner = True
            log.info("ray: connected to %s", address or "a local instance")
        if address and self.workers <= 1:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._key = uuid.uuid4().hex
        self._init = [initializer, ray.put(tuple(initargs))]
        self._remote = ray.remote(num_cpus=1)(_ray_task)

    def map(self, fn, items, *, ahead=None, return_failures=False):
        ray = self._ray
        width = self._ahead(ahead)
        todo = iter(items)
        pending: deque[tuple[Any, Any]] = deque(
            (item, self._remote.remote(self._key, self._init, fn, item))
            for item in itertools.islice(todo, width))
        try:
            while pending:
                item, ref = pending.popleft()
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    if isinstance(cause, KeyboardInterrupt):
                        raise cause from None
                    if not return_failures:
                        raise _task_error(item, cause, False) from exc
                    result = TaskFailure(item, cause)
                except ray.exceptions.RayError as exc:  # worker or node lost
                    if not return_failures:
                        raise _task_error(item, exc, True) from exc
                    result = TaskFailure(item, exc, worker_lost=True)
                for nxt in itertools.islice(todo, 1):
                    pending.append((nxt, self._remote.remote(self._key, self._init, fn, nxt)))
                yield result
        finally:
            for _, ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def close(self) -> None:
        if self._owner and self._ray.is_initialized():
            self._ray.shutdown()
        self._owner = False


def check_executor(kind: str, address: str | None = None) -> None:
    """Check executor options before any work starts (the same checks as
    :func:`make_executor`, without starting anything).

    Raises:
        ConfigError: an unknown kind, an address without ``ray``, or Ray missing (the
            message tells how to install it).
    """
    if kind not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}; got {kind!r}")
    if address and kind != "ray":
        raise ConfigError("a Ray address needs executor 'ray' (--executor ray)")
    if kind == "ray":
        _import_ray()


def make_executor(kind: str = "local", workers: int = 1, *, address: str | None = None,
                  initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = (),
                  threads: int | None = None, ray_init: dict | None = None) -> Executor:
    """An executor for :meth:`Executor.map` (use it as a context manager).

    Args:
        kind: ``local`` or ``ray``.
        workers: parallel workers (>= 1). ``local``: processes (1: this process). ``ray``:
            CPUs of the private local instance; with a cluster, the tasks in flight
            (1: as many as the cluster has CPUs).
        address: Ray cluster address ``HOST:PORT`` (default: ``RAY_ADDRESS``, else a
            private local instance); only with ``ray``.
        initializer: module-level function run once in every worker process before its
            first item, with ``initargs`` (sent once). Not called in process.
        threads: BLAS/OpenMP threads of each local pool worker (default: its CPU share);
            Ray tasks always use one.
        ray_init: extra keyword arguments of ``ray.init`` (when this call starts Ray).

    Raises:
        ConfigError: an unknown kind, workers < 1, an address without Ray, or Ray missing
            (the message tells how to install it).
    """
    check_executor(kind, address)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1; got {workers!r}")
    if kind == "local":
        if workers == 1:
            return _InProcess(1)
        return _ProcessPool(workers, initializer, tuple(initargs), threads)
    return _Ray(workers, address, initializer, tuple(initargs), ray_init)


def add_arguments(parser: Any) -> None:
    """The ``--executor`` and ``--ray-address`` options of the parallel commands."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="run the work here / in local processes (local, default) or "
                             "as Ray tasks (ray: a private local instance with --workers "
                             "CPUs, or the cluster of --ray-address)")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help="Ray cluster to use, e.g. HEAD:6379 (default: the RAY_ADDRESS "
                             "environment variable, else a local instance)")
