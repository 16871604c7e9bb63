"""Small helpers shared by test modules."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from typing import Iterator

TOPICS = ["the sea", "a cat", "bread", "the moon", "rain", "a library", "trains", "snow", "coffee", "maps"]


def story_rows(n: int, *, chat: tuple[int, int], commas: int, budget_every: int = 3,
               budget: tuple[int, int] = (3, 7)) -> list[dict]:
    """Prompt rows of different lengths (``commas`` varies them): row i is a chat row when
    ``i % chat[0] == chat[1]``, and every ``budget_every``-th has its own ``max_tokens``
    (so that rows finish at different steps)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if i % chat[0] == chat[1]:
            rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"One fact about {topic}."}]})
        else:
            rows.append({"id": f"r{i}", "prompt": f"Here is a short story about {topic}" + "," * (i % commas)})
        if i % budget_every == 0:
            rows[-1]["max_tokens"] = budget[0] + i % budget[1]
    return rows


def count_scheduler_messages(scheduler) -> dict[str, int]:
    """Count, by handler name, the messages ``scheduler`` handles from now on."""
    counts: dict[str, int] = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for table in (scheduler.handlers, scheduler.stream_handlers):
        for name in list(table):
            table[name] = counting(name, table[name])
    return counts


@contextlib.contextmanager
def glinthawk_cluster() -> Iterator[str]:
    """`glinthawk cluster` (1 dense, 2 attention worker processes) while the block runs;
    its scheduler's address.  Stopped with SIGINT, as a user stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "glinthawk_dask", "cluster", "--dashboard-address", ":0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("glinthawk scheduler at "), line
        yield line.split()[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
