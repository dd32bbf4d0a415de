"""Talking to the other ranks: every collective of sparsexpert, and the failure watch.

- `all_reduce`, `all_gather`, `all_gather_object`, `barrier`: the only calls of torch.distributed
  collectives in the code base (tests/test_device.py checks the source). `all_reduce` and `all_gather`
  refuse a tensor on another device than the backend's (NCCL reduces CUDA tensors only; gloo reduces anything, which hid such
  mistakes on our CPU machines) and, in check mode, one that did not pass through
  `sparsexpert.distributed.device.to_device`.
- `RankWatch`: when one rank fails, every rank stops within seconds naming it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from sparsexpert.distributed import device as _device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def store() -> Any:
    """The rendezvous store (a TCPStore in rank 0's process): small keys every rank can set and wait for."""
    return dist.distributed_c10d._get_default_store()


def _check_backend_device(tensor: torch.Tensor, what: str, group: Any) -> None:
    if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        raise RuntimeError(
            f"{what} of a tensor on {tensor.device} over NCCL, which reduces CUDA tensors only: create "
            "the buffer on the engine's device (sparsexpert.distributed.device.to_device)"
        )


def all_reduce(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `tensor` over the ranks of `group` (default: all), in place; returns it. A no-op without
    torch.distributed."""
    _device.check_placed(tensor, "all_reduce buffer")
    if not dist.is_initialized():
        return tensor
    _check_backend_device(tensor, "all_reduce", group)
    dist.all_reduce(tensor, group=group)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (the same shape on every rank) stacked along a new first dimension in rank
    order: [world, *tensor.shape], on the tensor's device, in one collective. Without torch.distributed,
    [1, *shape]. For tensors computed on the device (not checked for `to_device`'s mark)."""
    if not dist.is_initialized():
        return tensor.unsqueeze(0)
    _check_backend_device(tensor, "all_gather", None)
    out = tensor.new_empty((dist.get_world_size(), *tensor.shape))
    # into views of one buffer (gloo has no all_gather_into_tensor; NCCL takes either)
    dist.all_gather(list(out.unbind(0)), tensor.contiguous())
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled through the backend: small objects only)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> NoReturn:
    """End a process that used torch.distributed once its work is done (the launchers call it after
    `main()` returns): flush, then leave with os._exit(0), without interpreter finalization.

    torch quirk (pytorch/pytorch#190489, open; torch 2.13 with gloo): a gloo worker thread releases a
    finished collective (an all-to-all's tensors and their Python objects, which needs the GIL) a
    moment after the caller has its result. If the interpreter finalizes meanwhile, CPython ends the
    thread while it takes the GIL, the unwinding passes a noexcept destructor (~AsyncAlltoallWork)
    and the process aborts: "terminate called without an active exception", exit status -6, after a
    run that succeeded (2 in 82 launches of an expert-parallel script under load here; 6 in 10 with
    the race forced; none in 55 with this exit). Everything a run writes is closed by then; DeepSpeed
    registers no exit handler we rely on; logging is flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


UNREACHABLE = "rank 0 (which hosts the rendezvous store) is unreachable"


class RankWatch:
    """When one rank fails, stop every rank within seconds, each printing one line that names the
    failed rank(s), with exit status 1 (a context manager around a loop: pretraining, fine-tuning,
    evaluation; `Harness.watch`).

    A dead peer may make the next collective raise (gloo: "Connection reset by peer"), but under
    NCCL a collective with a dead or stopped peer waits for the collective timeout (10 minutes by
    default), as does any collective with a healthy peer that has given up; and DeepSpeed's
    launcher stops only the ranks of its own node. So, through the rendezvous store (the TCPStore
    in rank 0's process), from a daemon thread on every rank that runs on while the main thread
    waits in a collective (torch releases the GIL there):
    - every rank but 0 adds 1 to its heartbeat counter every `poll_s`; rank 0 reads all counters
      in one `multi_get` and takes a rank for dead when its counter has not moved for `dead_s`, or
      has never moved `start_s` after rank 0's watch started (a rank that has not yet opened its
      watch is not dead). The beats come from the thread, not the loop: a rank in a long step
      (minutes on a big model) beats on; a rank whose process stopped (killed, frozen, its node
      gone or cut off) does not. Rank 0 then raises the failure count;
    - a rank whose loop raises records its error and raises the failure count;
    - every rank reads the count every `poll_s` and joins in by marking itself alive; rank 0 waits
      up to `grace_s` for the marks of the ranks not known for dead, names the ranks that never
      marked (their process died or hangs) and those that raised something other than a
      communication error, publishes that verdict, and keeps the store up until it has been read;
    - every rank prints the verdict and leaves with os._exit(1), which nothing in interpreter
      teardown can hang; a timer does the same if the store stops answering meanwhile.
    A rank whose store call fails (rank 0 died) stops within `grace_s`, one whose store call has
    not returned after `dead_s` (rank 0 hangs: nothing times out a store call's answer, so a
    second thread watches for that) at once, both saying rank 0 is unreachable. A rank that leaves
    its watch normally says so, and rank 0 no longer expects its beats while it finishes.
    Heartbeats cannot see a main thread stuck in a live process (a CUDA kernel that never returns):
    its thread beats on, and the collective timeout remains the bound there. A main thread that
    holds the GIL for `dead_s` (no other Python thread runs) looks dead.

    The thread has its own connection to the store (so a long call of the main thread's does not
    hold up its beats), with `dead_s` as its timeout. Store traffic per `poll_s`: two small
    requests per rank but 0 (beat, read the count) and rank 0's `multi_get` of `world` keys; at 8
    ranks and the defaults 15 requests a second, at 4096 ranks about 8,200 and a 4096-key read of
    about 270 kB (one client alone gets some 24,000 adds a second from a TCPStore on our CPU
    machines). In a world of one, exceptions propagate as usual. Every rank opens its watches in
    the same order (they wrap the same loops).
    """

    PREFIX = "sparsexpert/failure"
    _opened = 0  # watches this process has opened: their heartbeat keys do not meet

    def __init__(
        self,
        rank: int,
        world: int,
        poll_s: float = 1.0,
        dead_s: float = 10.0,
        start_s: float = 60.0,
        grace_s: float = 5.0,
        what: str = "training",
    ):
        if not 0 < poll_s < dead_s <= start_s:
            raise ValueError(
                f"RankWatch needs 0 < poll_s < dead_s <= start_s, got {poll_s}, {dead_s}, {start_s}"
            )
        self.rank, self.world, self.poll_s, self.grace_s = rank, world, poll_s, grace_s
        self.what = what  # the loop watched, for the message: "training", "fine-tuning", "evaluation"
        self.dead_s, self.start_s = dead_s, start_s
        self.step = 0  # the step being computed, for the message (the training loop sets it)
        self._stopped = threading.Event()
        self._reporting = threading.Lock()
        self._beats = f"beat/{RankWatch._opened}"
        RankWatch._opened += 1
        self._store = None
        if world > 1:
            self._store = store().clone()
            self._store.set_timeout(datetime.timedelta(seconds=dead_s))
        self._calling_since: float | None = None  # when the watch thread's store call began
        self._threads = [threading.Thread(target=self._watch, name="sparsexpert-rank-watch", daemon=True)]
        if rank != 0:
            self._threads.append(
                threading.Thread(target=self._sentinel, name="sparsexpert-store-watch", daemon=True)
            )

    def __enter__(self) -> RankWatch:
        if self._store is not None:
            for thread in self._threads:
                thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stopped.set()
        if self._store is None:
            return
        if isinstance(exc, Exception):
            self.fail(exc)
        for thread in self._threads:
            thread.join(timeout=self.poll_s + 5)  # not in the store when the interpreter goes
        if exc is None and self.rank != 0:
            with contextlib.suppress(Exception):  # rank 0 may be gone already: the job is over
                self._store.add(self._key(self._beats, self.rank), Heartbeats.FINISHED)

    def _key(self, *parts: object) -> str:
        return "/".join((self.PREFIX, *map(str, parts)))

    def _shared_store(self) -> Any:
        """The store the ranks talk through; only a watch over several processes has one (and runs)."""
        if self._store is None:
            raise RuntimeError("RankWatch over one process has no store: nothing to watch or report to")
        return self._store

    def _watch(self) -> None:
        store, count = self._shared_store(), self._key("count")
        try:
            self._calling_since = time.monotonic()
            if self.rank == 0:
                others = range(1, self.world)
                keys = [count] + [self._key(self._beats, r) for r in others]
                for key in keys:  # every key exists before the first multi_get (which waits for missing ones)
                    store.add(key, 0)
                beats = Heartbeats(others, time.monotonic(), self.dead_s, self.start_s)
            while True:
                self._calling_since = time.monotonic()
                if self.rank == 0:
                    failed, *counters = map(int, store.multi_get(keys))
                    dead = beats.update(dict(zip(others, counters)), time.monotonic())
                else:
                    store.add(self._key(self._beats, self.rank), 1)
                    failed, dead = store.add(count, 0), []
                self._calling_since = None
                if self._stopped.is_set():
                    return
                if dead:
                    store.add(count, 1)
                    self._stop_all(None, dead=dead)
                if failed:
                    self._stop_all(None)
                if self._stopped.wait(self.poll_s):
                    return
        except Exception as err:  # rank 0 died: unless this rank is done anyway
            self._calling_since = None
            if not self._stopped.wait(self.grace_s):
                self._stop_all(None, unreachable=err)

    def _sentinel(self) -> None:
        while not self._stopped.wait(self.poll_s):
            since = self._calling_since
            if since is not None and time.monotonic() - since > self.dead_s:
                self._stop_all(None, unreachable=TimeoutError(f"no answer within {self.dead_s:g} s"))

    def fail(self, exc: Exception) -> NoReturn:
        """This rank's loop raised `exc`: tell the other ranks, stop them all."""
        self._stop_all(exc)

    def _stop_all(
        self, exc: Exception | None, dead: list[int] | None = None, unreachable: Exception | None = None
    ) -> NoReturn:
        if not self._reporting.acquire(blocking=False):
            while True:  # the other thread of this process is reporting; it ends the process
                time.sleep(60)
        backstop = threading.Timer(2 * self.grace_s + 10, self._leave, (UNREACHABLE + " (no answer)",))
        backstop.daemon = True
        backstop.start()
        try:
            if unreachable is not None:
                raise unreachable
            if exc is not None:
                self._record(exc)
            verdict = self._verdict(dead or [])
        except Exception as err:
            verdict = f"{UNREACHABLE} ({type(err).__name__})"
        self._leave(verdict)

    def _leave(self, verdict: str) -> NoReturn:
        print(
            f"sparsexpert: {self.what} failed: {verdict}; rank {self.rank} stops at step {self.step} "
            "with exit status 1",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)

    def _record(self, exc: Exception) -> None:
        comm = _raised_by_a_collective(exc)
        if not comm:  # the root cause is here: its traceback helps (a peer's death gives no news)
            traceback.print_exception(exc, file=sys.stderr)
        msg = str(exc).strip()
        what = f"{type(exc).__name__}: {msg.splitlines()[0]}" if msg else type(exc).__name__
        store = self._shared_store()
        store.set(self._key("error", self.rank), json.dumps({"comm": comm, "what": what[:300]}))
        store.add(self._key("count"), 1)

    def _verdict(self, dead: list[int]) -> str:
        """`dead`: the ranks rank 0 already knows for dead (no heartbeat); it does not wait for them."""
        store, key = self._shared_store(), self._key
        store.set(key("alive", self.rank), "1")
        store.add(key("alive_count"), 1)
        if self.rank != 0:
            store.wait([key("verdict")], datetime.timedelta(seconds=self.grace_s + 5))
            verdict = store.get(key("verdict")).decode()
            store.add(key("read"), 1)
            return verdict
        deadline = time.monotonic() + self.grace_s
        while store.add(key("alive_count"), 0) < self.world - len(dead) and time.monotonic() < deadline:
            time.sleep(0.05)
        silent = [r for r in range(self.world) if not store.check([key("alive", r)])]
        errors = {
            r: json.loads(store.get(key("error", r)))
            for r in range(self.world)
            if store.check([key("error", r)])
        }
        verdict = describe_failure(silent, errors)
        store.set(key("verdict"), verdict)
        deadline = time.monotonic() + self.grace_s
        while store.add(key("read"), 0) < self.world - len(silent) - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return verdict


class Heartbeats:
    """Rank 0's account of the other ranks' heartbeat counters: which ranks are dead. Bookkeeping
    only (the caller reads the store and the clock)."""

    FINISHED = 1 << 62  # what a rank adds to its counter when it leaves its watch normally

    def __init__(self, ranks: Iterable[int], now: float, dead_s: float, start_s: float):
        self.dead_s, self.start_s = dead_s, start_s
        self._count = dict.fromkeys(ranks, 0)  # 0: no beat yet
        self._moved = dict.fromkeys(ranks, now)  # when the count last changed (or the watch started)

    def update(self, counts: dict[int, int], now: float) -> list[int]:
        """Take the counters read at `now`; return the ranks dead by then: a counter that has not
        moved for dead_s, or a rank that has not beaten once within start_s of the start."""
        for r, c in counts.items():
            if c != self._count[r]:
                self._count[r], self._moved[r] = c, now
        return [
            r
            for r, c in self._count.items()
            if c < self.FINISHED and now - self._moved[r] > (self.dead_s if c else self.start_s)
        ]


def _raised_by_a_collective(exc: BaseException) -> bool:
    """NCCL raises DistErrors; gloo plain RuntimeErrors (e.g. "Connection reset by peer"), from
    inside torch.distributed."""
    if isinstance(exc, dist.DistError):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename


def describe_failure(silent: list[int], errors: dict[int, dict[str, Any]]) -> str:
    """Which ranks failed: those that never answered, and those whose own code raised; when every
    error came from communication (a collective timed out), the ranks that saw it."""

    def ranks(rs) -> str:
        rs = sorted(rs)
        return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))

    parts = []
    if silent:
        parts.append(f"{ranks(silent)} stopped responding (process exited or hangs)")
    raised: dict[str, list[int]] = {}  # the same error on several ranks (a decision they all made) once
    for r, e in sorted(errors.items()):
        if not e["comm"]:
            raised.setdefault(e["what"], []).append(r)
    parts += [f"{ranks(rs)} raised {what}" for what, rs in raised.items()]
    if not parts and errors:
        first = errors[min(errors)]["what"]
        parts.append(f"a collective failed on {ranks(errors)} ({first})")
    return "; ".join(parts) or "a rank failed without telling which"
