"""The sweep's trial slots, shared by its searches (captune.search.slots), on the real local Ray cluster."""
from captune.search.slots import SharedSlots, SlotPool, create_pool, pool_name


def test_each_search_keeps_its_share_until_it_wants_no_more(ray_cluster):
    ray = ray_cluster
    pool = SlotPool.remote(2, ["cnn-lstm", "resnet-gru"])
    take = lambda search, trial: ray.get(pool.acquire.remote(search, trial))  # noqa: E731

    assert take("cnn-lstm", "c1")
    assert not take("cnn-lstm", "c2"), "the other search has not started yet: its share is kept for it"
    assert take("resnet-gru", "r1")
    assert not take("resnet-gru", "r2"), "no slot is free"
    pool.release.remote("resnet-gru", "r1")
    assert not take("cnn-lstm", "c2"), "resnet-gru still wants trials: its slot waits for it"
    assert take("resnet-gru", "r2")
    pool.satisfied.remote("resnet-gru")  # it has started its last trial
    pool.release.remote("resnet-gru", "r2")
    assert take("cnn-lstm", "c2"), "resnet-gru starts no more trials: cnn-lstm takes its slot"
    assert ray.get(pool.holders.remote()) == {"cnn-lstm": 2, "resnet-gru": 0}
    pool.release.remote("cnn-lstm", "unknown")  # a trial it never counted (restored by Tune): ignored
    assert ray.get(pool.holders.remote()) == {"cnn-lstm": 2, "resnet-gru": 0}


def test_a_slot_beyond_the_shares_goes_to_whoever_asks(ray_cluster):
    ray = ray_cluster
    pool = SlotPool.remote(3, ["a", "b"])
    assert [ray.get(pool.acquire.remote(*ask)) for ask in [("a", "1"), ("b", "1"), ("a", "2"), ("b", "2")]] \
        == [True, True, True, False]


def test_searcher_finds_the_pool_by_name_after_pickling(ray_cluster):
    from ray.tune.search.optuna import OptunaSearch

    pool = create_pool("pickled", 1, ["a"])
    searcher = SharedSlots(OptunaSearch(), "pickled", "a", slots=1, trials=4)
    assert searcher.pool() is not None
    state = searcher.__getstate__()  # what Tune's experiment snapshot pickles
    assert state["_pool"] is None, "an actor handle must not outlive the sweep in the snapshot"
    restored = SharedSlots.__new__(SharedSlots)  # as unpickling it on --resume does
    restored.__dict__.update(state)
    assert restored.suggested == 0
    assert ray_cluster.get(restored.pool().holders.remote()) == {"a": 0}
    assert pool_name("pickled") == "captune-slots-pickled"
    ray_cluster.kill(pool)
