"""Client side: a pipeline's progress, shown on the Glinthawk page."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from . import INTERVAL

__all__ = ["ProgressReporter"]

logger = logging.getLogger(__name__)


class ProgressReporter:
    """A ``progress`` callback for pipeline runs that shows them on the Glinthawk page.

    Sends the latest :class:`~glinthawk_dask.pipeline.run.Progress` to the scheduler
    (handler ``glinthawk_progress``) at most once per ``interval`` seconds, and the
    last one on :meth:`close`.  Failures are logged once and otherwise ignored.
    """

    def __init__(self, client: Any, name: str, interval: float = INTERVAL) -> None:
        self.client = client
        self.name = name
        self.interval = interval
        self._sent = float("-inf")
        self._pending: Any = None
        self._broken = False

    def __call__(self, progress: Any) -> None:
        self._pending = progress
        if time.monotonic() - self._sent >= self.interval:
            self._send(done=False)

    def close(self) -> None:
        if self._pending is not None:
            self._send(done=True)

    def _send(self, done: bool) -> None:
        if self._broken or self.client is None or self._pending is None:
            return
        p = self._pending
        fields = {k: v for k, v in vars(p).items() if isinstance(v, (int, float, str)) or v is None}
        fields["tokens_per_s"] = getattr(p, "tokens_per_s", 0.0)
        fields["eta_seconds"] = getattr(p, "eta_seconds", None)
        fields["recoveries"] = len(getattr(p, "recoveries", ()))
        fields["done"] = done
        self._sent = time.monotonic()
        try:
            if getattr(self.client, "asynchronous", False):
                asyncio.ensure_future(self._asend(fields))
            else:
                self.client.sync(self.client.scheduler.glinthawk_progress, name=self.name, progress=fields)
        except Exception as e:
            self._failed(e)

    async def _asend(self, fields: dict) -> None:
        try:
            await self.client.scheduler.glinthawk_progress(name=self.name, progress=fields)
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self._broken = True
        logger.info("glinthawk: cannot report pipeline progress to the scheduler (%s)", e)
