"""The asyncio micro-batcher and the status mapping of recsys.serving."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from recsys.errors import NotFoundError, RecsysError, ValidationError
from recsys.serving.batching import BatchConfig, MicroBatcher
from recsys.serving.errors import NotReadyError, OverloadedError, status_for


def test_concurrent_submits_share_engine_calls() -> None:
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        time.sleep(0.01)
        return [x * 2 for x in items]

    async def main() -> list[int]:
        batcher = MicroBatcher(fn, BatchConfig(max_batch=8, max_wait_ms=20))
        out = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.close()
        return out

    assert asyncio.run(main()) == [2 * i for i in range(20)]
    assert max(len(c) for c in calls) == 8 and len(calls) <= 4
    assert sorted(x for c in calls for x in c) == list(range(20))


def test_batching_off_runs_one_by_one() -> None:
    calls: list[list[int]] = []

    async def main() -> None:
        batcher = MicroBatcher(lambda xs: calls.append(xs) or xs, BatchConfig(max_batch=1))
        await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        assert batcher.stats()["mean_batch"] == 1.0
        await batcher.close()

    asyncio.run(main())
    assert all(len(c) == 1 for c in calls)


def test_per_item_errors_and_whole_batch_errors() -> None:
    def fn(items: list[int]) -> list[object]:
        if -1 in items:
            raise RuntimeError("engine down")
        return [ValidationError(f"bad {x}") if x % 2 else x for x in items]

    async def main() -> None:
        batcher = MicroBatcher(fn, BatchConfig(max_batch=4, max_wait_ms=5))
        res = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        assert res[0] == 0 and res[2] == 2
        assert isinstance(res[1], ValidationError) and isinstance(res[3], ValidationError)
        with pytest.raises(RuntimeError, match="engine down"):
            await batcher.submit(-1)
        assert await batcher.submit(6) == 6  # still serving
        await batcher.close()
        with pytest.raises(NotReadyError):
            await batcher.submit(1)

    asyncio.run(main())


def test_cancelled_callers_are_dropped_and_queue_is_bounded() -> None:
    seen: list[int] = []

    def fn(items: list[int]) -> list[int]:
        seen.extend(items)
        time.sleep(0.05)
        return items

    async def main() -> None:
        batcher = MicroBatcher(fn, BatchConfig(max_batch=1, max_wait_ms=0, queue_limit=3))
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # 0 is running
        doomed = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        doomed.cancel()
        others = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]  # queue: 1, 2, 3
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await batcher.submit(5)
        await asyncio.gather(first, *others)
        assert batcher.stats()["dropped"] == 1
        await batcher.close()

    asyncio.run(main())
    assert 1 not in seen and 5 not in seen


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ValidationError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (NotReadyError("x"), grpc.StatusCode.UNAVAILABLE),
        (OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RecsysError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (KeyError("secret"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(exc: BaseException, code: grpc.StatusCode) -> None:
    got, details = status_for(exc)
    assert got == code
    if code == grpc.StatusCode.INTERNAL:
        assert "secret" not in details


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_batch": 0}, "BatchConfig: max_batch: Input should be greater than or equal to 1"),
        ({"max_wait_ms": 2000.0}, "max_wait_ms: Input should be less than or equal to 1000"),
        ({"queue_limit": 0}, "queue_limit: Input should be greater than or equal to 1"),
    ],
)
def test_batch_config_names_the_bad_field(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        BatchConfig(**kwargs)
    assert needle in str(err.value)
