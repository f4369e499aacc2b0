"""Owned tasks: kept until they end, failures logged with what they served, cancellable together."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.proxy.tasks import OwnedTasks


async def test_a_failed_task_is_logged_with_its_name_and_what_it_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = OwnedTasks("data plane")
    described: list[str] = []

    def detail() -> str:
        described.append("asked")
        return "10.0.1.5:4321 -> 10.0.2.7:80"

    async def fails() -> None:
        raise RuntimeError("boom")

    async def succeeds() -> None:
        return None

    with caplog.at_level(logging.ERROR, logger="agent.proxy.tasks"):
        tasks.spawn(succeeds(), "outbound", detail=detail)
        tasks.spawn(fails(), "inbound tunnel", detail=detail)
        assert len(tasks) == 2
        assert await tasks.wait(5)
    assert len(tasks) == 0
    assert described == ["asked"]  # built for the failure only
    [record] = caplog.records
    assert record.getMessage() == "data plane: task 'inbound tunnel (10.0.1.5:4321 -> 10.0.2.7:80)' failed"
    assert record.exc_info is not None


async def test_cancel_ends_every_task() -> None:
    tasks = OwnedTasks("pool")
    started = [tasks.spawn(asyncio.sleep(60), "sleeper") for _ in range(3)]
    await tasks.cancel()
    assert len(tasks) == 0
    assert all(task.cancelled() for task in started)
    with pytest.raises(asyncio.CancelledError):
        await started[0]
