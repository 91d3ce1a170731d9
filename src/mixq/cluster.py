"""Work spread over Ray actors, on this machine or a Ray cluster: a pool of workers that each
load the model once, and ``map_layers`` for the work that splits by layer.

Ray schedules the actors (one per GPU: ``num_gpus=1`` each; CPU actors where there is no GPU),
restarts one that dies (killed, out of memory: ``max_restarts``) and runs the call it was
running again on the restarted actor (``max_task_retries``).  A call whose actor died for good
(restarted too often, its node gone) is sent again by the pool to another actor.  Each call
carries the key it was submitted under and the caller sees each key's result once.  Ray is an
optional extra: ``pip install 'mixq[ray]'``.

The model a worker loads is named by a ``ModelSpec`` (a model name, GGUF file or Hugging
Face folder, which every node must be able to read at the same path).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from mixq.errors import MixqError

INSTALL_HINT = "pip install 'mixq[ray]'"
MAX_RESTARTS = 3  # Ray restarts a dead worker this often (re-running its call); then the worker is given up
MAX_ATTEMPTS = 2  # workers given up while running one call before the run ends (the call is what kills them)
START_TIMEOUT = 1800.0  # seconds for every worker to load its model (a 70B from a network disk takes minutes)

T = TypeVar("T")
R = TypeVar("R")


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MixqError(f"--workers and --ray-address run on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model: ``device`` is ``cuda`` (the GPU Ray gave the actor) or ``cpu``."""

    model: str
    dtype: str
    device: str
    attn_implementation: str | None = None

    def load(self) -> Any:
        from mixq.models import load_model

        return load_model(self.model, dtype=self.dtype, device=self.device, attn_implementation=self.attn_implementation)


@dataclass(frozen=True)
class Cluster:
    """Where the workers run: ``workers`` actors, each given ``gpus`` GPUs and ``cpus`` CPUs (Ray sets
    ``OMP_NUM_THREADS`` to it: a CPU worker runs ``cpus`` threads), on a local Ray instance (``address`` None: started here, or
    the one this process already joined) or the cluster at ``address`` (``auto``, ``ray://host:port``)."""

    workers: int = 1
    address: str | None = None
    gpus: float = 0.0
    cpus: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise MixqError(f"--workers must be positive, got {self.workers}")
        if self.cpus < 1:
            raise MixqError(f"a worker needs at least one CPU, got {self.cpus}")

    @classmethod
    def for_device(cls, device: str, *, workers: int | None, address: str | None) -> Cluster:
        """One worker per GPU (``num_gpus=1``) on cuda, CPU workers otherwise; ``workers`` None: 1."""
        return cls(workers=workers or 1, address=address, gpus=1.0 if device.startswith("cuda") else 0.0)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """Ray, initialised: joins ``address``, or starts a local instance (shut down on exit)
        and checks that it can hold the workers."""
        ray = require_ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True)
        try:
            if started and self.address is None:
                have = ray.cluster_resources()
                for res, each in (("GPU", self.gpus), ("CPU", self.cpus)):
                    need = self.workers * each
                    if need > have.get(res, 0):
                        raise MixqError(f"--workers {self.workers} needs {need:g} {res}s; this machine has "
                                        f"{have.get(res, 0):g} (join a cluster with --ray-address)")
            yield ray
        finally:
            if started:
                ray.shutdown()


@dataclass(frozen=True)
class Finished:
    """A call's result, with the key it was submitted under."""

    key: Any
    value: Any


@dataclass
class _Call:
    key: Any
    method: str
    args: tuple[Any, ...]
    attempts: int = 1
    worker: int = -1


def identity() -> dict[str, Any]:
    """Where a worker runs: its process id and host (and GPU, where it has one)."""
    import torch

    out: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


class WorkerPool:
    """``cluster.workers`` Ray actors of ``worker_cls`` (built with ``args``), one call in flight on
    each.  ``submit`` a call under a key to a free worker; ``next`` waits for calls to finish
    and returns them, each key once.  Ray restarts a worker that dies (``MAX_RESTARTS`` times:
    its constructor runs again, loading the model) and runs its call again there; a call whose
    worker is given up is sent, first, to the next free worker."""

    def __init__(self, worker_cls: type, args: tuple[Any, ...], cluster: Cluster) -> None:
        ray = require_ray()
        self.ray = ray
        self.actor_cls = ray.remote(worker_cls).options(num_cpus=cluster.cpus, num_gpus=cluster.gpus,
                                                       max_restarts=MAX_RESTARTS, max_task_retries=-1)
        self.actors = [self.actor_cls.remote(*args) for _ in range(cluster.workers)]
        self.idle = list(range(cluster.workers))
        self.busy: dict[Any, _Call] = {}  # ObjectRef -> call
        self.retry: list[_Call] = []

    def start(self, timeout: float = START_TIMEOUT) -> list[dict[str, Any]]:
        """Wait until every worker has built its state; their ``identity()``."""
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return self.ray.get([a.identity.remote() for a in self.actors], timeout=timeout)
        except GetTimeoutError:
            raise MixqError(f"the {len(self.actors)} workers did not start within {timeout:.0f} s; the cluster has "
                            f"{self.ray.cluster_resources()}") from None
        except RayActorError as e:
            lines = [x for x in str(e).splitlines() if x.strip()]
            raise MixqError(f"a worker could not start: {lines[-1] if lines else type(e).__name__}") from None

    def free(self) -> int:
        """Workers free for a new call once the calls to re-send have gone."""
        return max(len(self.idle) - len(self.retry), 0)

    def pending(self) -> int:
        return len(self.busy) + len(self.retry)

    def submit(self, key: Any, method: str, *args: Any) -> None:
        if not self.idle:
            raise MixqError("no worker is free for another call")
        self._send(_Call(key, method, args))

    def _send(self, call: _Call) -> None:
        call.worker = self.idle.pop(0)
        self.busy[getattr(self.actors[call.worker], call.method).remote(*call.args)] = call

    def next(self) -> list[Finished]:
        """Wait for at least one call to finish; those finished (a worker's error in a call is raised here)."""
        from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, RayTaskError

        while True:
            while self.retry and self.idle:
                self._send(self.retry.pop(0))
            if not self.busy:
                raise MixqError("every worker died" if not self.idle else "no call in flight")
            ready, _ = self.ray.wait(list(self.busy), num_returns=1)
            out = []
            for ref in ready:
                call = self.busy.pop(ref)
                try:
                    value = self.ray.get(ref)
                except (RayActorError, OutOfMemoryError, NodeDiedError) as e:
                    self._lost(call, e)
                    continue
                except RayTaskError as e:
                    if isinstance(e.cause, MixqError):
                        raise e.cause from None
                    raise
                self.idle.append(call.worker)
                out.append(Finished(call.key, value))
            if out:
                return out

    def _lost(self, call: _Call, error: Exception) -> None:
        """The call's worker is given up (Ray restarted it and re-ran the call as often as allowed)."""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mixq: worker {call.worker} given up running call {call.key!r} ({first})", file=sys.stderr)
        if call.attempts >= MAX_ATTEMPTS:
            raise MixqError(f"call {call.key!r}: {call.attempts} workers died running it (last: {first})")
        call.attempts += 1
        self.retry.append(call)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)


class ItemWorker:
    """A ``map_layers`` worker: ``fn_factory()`` once (it loads the model), then ``run(item)``."""

    def __init__(self, fn_factory: Callable[[], Callable[[Any], Any]]) -> None:
        self.fn = fn_factory()

    def identity(self) -> dict[str, Any]:
        return identity()

    def run(self, item: Any) -> Any:
        return self.fn(item)


def map_layers(fn_factory: Callable[[], Callable[[T], R]], items: Sequence[T], *, cluster: Cluster,
               progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, R]]:
    """``fn(item)`` for every item, on ``cluster.workers`` Ray actors each of which calls
    ``fn_factory()`` once (it loads the model and whatever it needs, and returns ``fn``); yields
    ``(index, result)`` as each result arrives (in any order), every index once, an item whose
    worker died run again; ``progress(done, total)`` after each.  ``fn_factory`` must pickle (a
    frozen dataclass with ``__call__``)."""
    with cluster.connect():
        pool = WorkerPool(ItemWorker, (fn_factory,), cluster)
        try:
            pool.start()
            todo = list(range(len(items)))
            done = 0
            while done < len(items):
                while todo and pool.free():
                    i = todo.pop(0)
                    pool.submit(i, "run", items[i])
                for f in pool.next():
                    done += 1
                    if progress is not None:
                        progress(done, len(items))
                    yield f.key, f.value
        finally:
            pool.close()


__all__ = ["INSTALL_HINT", "MAX_ATTEMPTS", "MAX_RESTARTS", "Cluster", "Finished", "ItemWorker", "ModelSpec",
           "WorkerPool", "identity", "map_layers", "require_ray"]
