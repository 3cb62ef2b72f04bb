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
    def subscribe(self, job_id: str):
        """An ``asyncio.Queue`` of ``(event, data)`` for ``job_id`` while the block runs (call on the loop)."""
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subs[job_id].append(q)
        try:
            yield q
        finally:
            with self._lock:
                subs = self._subs.get(job_id, [])
                if q in subs:
                    subs.remove(q)
                if not subs:
                    self._subs.pop(job_id, None)

    def publish(self, job_id: str, event: str, data: dict) -> None:
        """Hand ``(event, data)`` to every subscriber of ``job_id`` (from any thread)."""
        with self._lock:
            subs = list(self._subs.get(job_id, ()))
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
