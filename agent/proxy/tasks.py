"""Owned background tasks: every task the data plane starts is named, referenced until it ends, and
its failure is logged instead of vanishing with a garbage-collected task.

A task serving one connection is named for its kind, and the connection it serves (its addresses)
is put into words only if the task fails: formatting two addresses per connection cost the
destination agent ~7 us of every new connection's path, for a name nobody reads while it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class OwnedTasks:
    """A set of running tasks that one component owns and can wait for or cancel."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: dict[asyncio.Task[Any], Callable[[], str] | None] = {}
        """The running tasks, each with what describes it beyond its name (see `spawn`)."""

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self, coroutine: Coroutine[Any, Any, _T], name: str, *, detail: Callable[[], str] | None = None
    ) -> asyncio.Task[_T]:
        """Starts `coroutine` as a task called `name`; it is kept until it ends. `detail` says what
        the task serves (e.g. a connection's addresses) in the log line of its failure, the only
        place it is built."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks[task] = detail
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        detail = self._tasks.pop(task, None)
        if task.cancelled():
            return
        if (error := task.exception()) is not None:
            about = f"{task.get_name()} ({detail()})" if detail is not None else task.get_name()
            log.error("%s: task %r failed", self._owner, about, exc_info=error)

    async def wait(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for every task (including ones started meanwhile) to end;
        True if none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def cancel(self) -> None:
        """Cancels every task and waits until they have all ended."""
        while self._tasks:
            tasks = set(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
