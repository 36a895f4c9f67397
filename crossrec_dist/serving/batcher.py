"""Micro-batching: concurrent requests, of any regions, answered by one forward pass.

Requests wait in a queue; one worker thread takes the first, then keeps gathering until ``max_batch``
queries are in or ``max_wait_ms`` has passed since the first arrived, and answers them all with one
``ServingEngine.answer`` call (one forward for every shared-adapter row, whatever its region). The
worker is the only thread that runs the models, and adapter swaps run on it too (``call``), between
batches: no request ever sees a half-installed adapter, and none is dropped by a swap -- a query is
answered by the version live when its batch runs, and its answer names that version.

``mode="switch"`` answers one request at a time, switching the shared model's active adapter to the
request's region first (what ``Recommender`` did before this engine): the baseline the load test
compares mixed batching with.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from .engine import Query, ServingEngine

MODES = ("mixed", "switch")


class _Call:
    def __init__(self, fn):
        self.fn, self.future = fn, Future()


class MicroBatcher:
    def __init__(self, engine: ServingEngine, max_batch: int = 32, max_wait_ms: float = 2.0, mode: str = "mixed",
                 on_batch=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.engine, self.max_batch, self.max_wait, self.mode = engine, max_batch, max_wait_ms / 1000, mode
        self.on_batch = on_batch          # called with each batch's size (metrics)
        self._queue: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crossrec-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, query: Query) -> Future:
        future: Future = Future()
        self._queue.put((query, future))
        return future

    def call(self, fn) -> Future:
        """Run ``fn()`` on the worker thread, after the batch in progress (adapter swaps)."""
        job = _Call(fn)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        pending = None
        while not self._stopping.is_set():
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is None:
                break
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            batch = [item]
            if self.mode == "mixed":
                deadline = time.perf_counter() + self.max_wait
                while len(batch) < self.max_batch:
                    left = deadline - time.perf_counter()
                    try:
                        nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None or isinstance(nxt, _Call):
                        pending = nxt        # after this batch: a swap waits for the queries before it
                        break
                    batch.append(nxt)
            self._answer(batch)
        for item in self._drain():
            if isinstance(item, tuple):
                item[1].set_exception(RuntimeError("server shutting down"))

    def _drain(self):
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _run_call(self, job: _Call) -> None:
        try:
            job.future.set_result(job.fn())
        except BaseException as e:       # the caller gets the error; the worker keeps serving
            job.future.set_exception(e)

    def _answer(self, batch) -> None:
        queries = [q for q, _ in batch]
        try:
            if self.mode == "switch":
                results = [self.engine.answer_switching(q) for q in queries]
            else:
                results = self.engine.answer(queries)
        except BaseException as e:
            for _, future in batch:
                future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for (_, future), result in zip(batch, results):
            future.set_result(result)
