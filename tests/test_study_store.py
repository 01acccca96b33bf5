"""The study store against a real Redis: the per-owner limit on running studies holds when
submissions race (the count and the write are one optimistic transaction), and a cancel takes
the canceled items out of the study queue at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from workers.jobqueue import queue_key
from workers.redis_server import EmbeddedRedis
from workers.study_store import NewItem, StudyStore, study_queue

QUEUE = "unbox"


@pytest.fixture(scope="module")
def connection() -> Iterator[redis.Redis]:
    server = EmbeddedRedis().start()
    try:
        yield redis.Redis.from_url(server.url)
    finally:
        server.close()


def create(store: StudyStore, study_id: str, owner: str, limit: int, items: int = 3) -> dict[str, str] | None:
    queued = [NewItem(index=k, method="gradcam", payload={"method": "gradcam", "model": "tiny"}) for k in range(items)]
    return store.create(study_id, owner, {"name": study_id, "spec": "{}", "manifest": "[]"}, [b"image"], {}, queued,
                        ttl_s=600, result_ttl_s=600, max_active=limit)


def test_racing_submissions_cannot_pass_the_running_studies_limit(connection: redis.Redis) -> None:
    stores = [StudyStore(redis.Redis(connection_pool=connection.connection_pool), QUEUE) for _ in range(12)]
    start = threading.Barrier(len(stores))
    outcomes: dict[str, bool] = {}

    def submit(index: int) -> None:
        start.wait()
        outcomes[f"race{index:02d}"] = create(stores[index], f"race{index:02d}", "alice", limit=3) is not None

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(outcomes.values()) == 3, outcomes
    store = stores[0]
    assert store.active("alice") == 3
    assert create(store, "bob01", "bob", limit=3) is not None  # the limit is per owner
    # once one ends (canceled here), a new one is admitted
    admitted = next(name for name, ok in outcomes.items() if ok)
    assert store.cancel(admitted, "alice", 60) == "canceled"
    assert create(store, "later", "alice", limit=3) is not None
    assert create(store, "refused", "alice", limit=3) is None


def test_a_cancel_takes_the_studys_items_out_of_the_queue(connection: redis.Redis) -> None:
    store = StudyStore(connection, QUEUE)
    create(store, "keep", "carol", limit=0, items=4)
    create(store, "drop", "carol", limit=0, items=5)
    create(store, "keep2", "carol", limit=0, items=2)
    key = queue_key(study_queue(QUEUE))
    before = [v.decode() for v in connection.lrange(key, 0, -1) if v.decode().split("-")[0] in ("keep", "keep2")]
    assert store.cancel("drop", "carol", 60) == "canceled"  # nothing was running: every item canceled
    after = [v.decode() for v in connection.lrange(key, 0, -1)]
    assert not [v for v in after if v.startswith("drop-")]
    assert [v for v in after if v.split("-")[0] in ("keep", "keep2")] == before  # the others, in order
    assert store.cancel("drop", "mallory", 60) == "missing"  # another owner's study
