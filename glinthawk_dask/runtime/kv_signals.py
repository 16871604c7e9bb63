"""The scheduler's word to clients when KV changes hands between runs.

Runs that share a cluster act on each other's KV: a run holding more than its share
gives some up while another waits to be placed, a waiting run asks again once some is
freed, and a run placed short grows into it.  Each looked on its own clock (the first
every ``glinthawk.engine.grow-every`` seconds, a waiting run every second), so a
waiting run waited up to both before it was placed.  The scheduler now announces each
change on one topic of distributed's structured events (``Scheduler.log_event``, pushed
to subscribed clients over their batched stream): ``"wanted"`` when a run begins to
wait for KV, ``"placed"`` and ``"grew"`` when a run takes KV, ``"freed"`` when a run
gives some back.  A client subscribes once; each of its runs and placements listens for
the kinds it acts on and looks at once.  The clocks stay as they were: a missed word (a
client reconnecting) costs only the old wait.

The same events are the cluster's record of who held KV when: ``glinthawk status`` and
the dashboard page show the last of them (:func:`event_text`), and anyone can read them
with ``Client.get_events("glinthawk-kv")``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, Callable

from ..engine.progress import bytes_text

__all__ = ["TOPIC", "Listener", "announce", "event_text", "listen", "recent", "run_name"]

TOPIC = "glinthawk-kv"
KINDS = ("wanted", "placed", "grew", "freed")


def announce(scheduler: Any, kind: str, run_id: str, nbytes: int = 0, detail: str = "", label: str = "") -> None:
    """Tell the subscribed clients that run ``run_id`` began to wait for KV
    (``"wanted"``), took ``nbytes`` (``"placed"``, ``"grew"``) or gave ``nbytes`` back
    (``"freed"``); ``detail`` says why or how, ``label`` what the run is for (a
    pipeline's name), for people."""
    if kind not in KINDS:
        raise ValueError(f"unknown KV signal {kind!r} (expected one of {KINDS})")
    scheduler.log_event(TOPIC, {"kind": kind, "run_id": run_id, "bytes": int(nbytes), "detail": detail,
                                "label": label})


def run_name(run_id: str, label: str = "") -> str:
    """A run as people read it: ``gh-2c469532dd76 (pipeline a)``."""
    return f"{run_id} ({label})" if label else run_id


def recent(scheduler: Any, n: int = 10) -> list[dict]:
    """The last ``n`` announcements, oldest first, each with its ``time``."""
    return [{"time": t, **msg} for t, msg in list(scheduler.get_events(TOPIC))[-n:] if isinstance(msg, dict)]


def event_text(event: dict) -> str:
    """One announcement (an item of :func:`recent`) as people read it:
    ``12:03:01 gh-8a1c waits for KV (held by ...)``."""
    verb = {"wanted": "waits for KV", "placed": "placed with", "grew": "grew by", "freed": "gave back"}
    what = verb.get(event.get("kind"), str(event.get("kind")))
    if event.get("kind") != "wanted":
        what += f" {bytes_text(int(event.get('bytes', 0)))} of KV"
    detail = f" ({event['detail']})" if event.get("detail") else ""
    when = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    return f"{when} {run_name(str(event.get('run_id')), event.get('label', ''))} {what}{detail}"


class Listener:
    """The word a run or a placement waits for: ``fired`` once one of its ``kinds`` came,
    until :meth:`take` or :meth:`wait` consumes it."""

    def __init__(self, kinds: tuple[str, ...], own: str | None = None,
                 on_word: Callable[[], None] | None = None) -> None:
        self.kinds, self.own = kinds, own  # (a run's own announcements do not wake it)
        self.on_word = on_word  # called on the client's event loop as word comes
        self.fired = False
        self._event: asyncio.Event | None = None

    def _hear(self, msg: dict) -> None:
        if msg.get("kind") in self.kinds and msg.get("run_id") != self.own:
            self.fired = True
            if self._event is not None:
                self._event.set()
            if self.on_word is not None:
                self.on_word()

    def take(self) -> bool:
        """Whether word came since the last look (and forget it)."""
        fired, self.fired = self.fired, False
        return fired

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for word (at once if it already came);
        whether it came."""
        if not self.fired:
            self._event = self._event or asyncio.Event()
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.take()


class _Hub:
    """One client's subscription, handing each announcement to its listeners."""

    def __init__(self, client: Any) -> None:
        self.listeners: weakref.WeakSet[Listener] = weakref.WeakSet()
        client.subscribe_topic(TOPIC, self._handle)

    def _handle(self, event: tuple[float, Any]) -> None:
        _, msg = event
        if isinstance(msg, dict):
            for listener in list(self.listeners):
                listener._hear(msg)


_hubs: "weakref.WeakKeyDictionary[Any, _Hub]" = weakref.WeakKeyDictionary()


def listen(client: Any, kinds: tuple[str, ...], own: str | None = None,
           on_word: Callable[[], None] | None = None) -> Listener:
    """A :class:`Listener` for ``kinds`` of word on ``client`` (subscribed on first use;
    call it on the client's event loop), not of run ``own``; ``on_word()`` is called as
    each comes.  It stops hearing once dropped."""
    hub = _hubs.get(client)
    if hub is None:
        hub = _hubs[client] = _Hub(client)
    listener = Listener(kinds, own, on_word)
    hub.listeners.add(listener)
    return listener
