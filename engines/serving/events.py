"""Job events from the engine thread to the asyncio side: subscribers get every event of one job in order.

The engine thread calls :meth:`EventHub.publish`; each subscriber (an SSE stream, a synchronous request waiting for
its job) holds an ``asyncio.Queue`` filled on the event loop through ``call_soon_threadsafe``, so nothing polls.

>>> import asyncio
>>> async def demo():
...     hub = EventHub(asyncio.get_running_loop())
...     with hub.subscribe("j") as q:
...         hub.publish("j", "progress", {"step": 1})
...         return await q.get()
>>> asyncio.run(demo())
('progress', {'step': 1})
>>> async def waiter():             # a subscriber of "completed" alone is not woken by progress
...     hub = EventHub(asyncio.get_running_loop())
...     with hub.subscribe("j", events=("completed",)) as q:
...         hub.publish("j", "progress", {"step": 1}); hub.publish("j", "completed", {"status": "succeeded"})
...         return await q.get(), q.qsize()
>>> asyncio.run(waiter())
(('completed', {'status': 'succeeded'}), 0)
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading


class EventHub:
    def __init__(self, loop: "asyncio.AbstractEventLoop | None" = None):
        self.loop = loop
        self._subs: "dict[str, list[asyncio.Queue]]" = collections.defaultdict(list)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def subscribe(self, job_id: str, events=None):
        """An ``asyncio.Queue`` of ``(event, data)`` for ``job_id`` while the block runs (call on the loop); only
        ``events`` when given (a synchronous request waits for "completed" alone: the engine thread's per-step
        progress then wakes nothing)."""
        q: asyncio.Queue = asyncio.Queue()
        entry = (q, None if events is None else frozenset(events))
        with self._lock:
            self._subs[job_id].append(entry)
        try:
            yield q
        finally:
            with self._lock:
                subs = self._subs.get(job_id, [])
                if entry in subs:
                    subs.remove(entry)
                if not subs:
                    self._subs.pop(job_id, None)

    def publish(self, job_id: str, event: str, data: dict) -> None:
        """Hand ``(event, data)`` to every subscriber of ``job_id`` (from any thread)."""
        with self._lock:
            subs = [q for q, wanted in self._subs.get(job_id, ()) if wanted is None or event in wanted]
        if not subs or self.loop is None or self.loop.is_closed():
            return
        for q in subs:
            try:
                self.loop.call_soon_threadsafe(q.put_nowait, (event, data))
            except RuntimeError:        # the loop closed while shutting down
                return


def sse(event: str, data: dict, event_id: "int | None" = None) -> str:
    """One server-sent event.

    >>> sse("progress", {"step": 2}, 7)
    'id: 7\\nevent: progress\\ndata: {"step": 2}\\n\\n'
    """
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"
