"""Trial slots shared by the searches of one sweep.

The architectures' searches run side by side, each its own Tune run. A fixed number of trials per
search leaves a slot idle as soon as one search has no trial left to start while the other still
has several; a search that may take every free slot takes them all before the other's Tune has
started. So the slots are one pool: while several searches still want trials, each is sure of its
fair share; a slot beyond it goes to a search only when no other search is short of its share;
and a search that will start no more trials gives its slots to the others as its trials end.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import ray
from ray.tune.search import ConcurrencyLimiter, Searcher


@ray.remote(num_cpus=0)
class SlotPool:
    """Which trials of which search hold a slot. One per sweep, named after it, owned by the
    driver (so it ends with the sweep)."""

    def __init__(self, slots: int, searches: list[str]):
        self.slots = slots
        self.running: dict[str, set[str]] = {name: set() for name in searches}
        self.wanting = set(searches)

    def acquire(self, search: str, trial_id: str) -> bool:
        held = self.running.setdefault(search, set())
        if sum(map(len, self.running.values())) >= self.slots:
            return False
        fair = max(1, self.slots // max(1, len(self.wanting)))
        others_short = any(len(self.running[o]) < fair for o in self.wanting if o != search)
        if len(held) >= fair and others_short:
            return False
        held.add(trial_id)
        return True

    def release(self, search: str, trial_id: str) -> None:
        self.running.get(search, set()).discard(trial_id)

    def satisfied(self, search: str) -> None:
        """The search starts no more trials: its share goes to the others as its trials end."""
        self.wanting.discard(search)

    def holders(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.running.items()}


def pool_name(sweep: str) -> str:
    return f"captune-slots-{sweep}"


def create_pool(sweep: str, slots: int, searches: list[str]):
    """The sweep's pool; the driver keeps the returned handle for as long as the searches run."""
    return SlotPool.options(name=pool_name(sweep), lifetime="non_detached").remote(slots, searches)


class SharedSlots(ConcurrencyLimiter):
    """A search's searcher, limited by the sweep's pool as well as by its own total (Tune's
    `max_concurrent_trials`). The pool is found by name, so a search restored from Tune's
    pickled state (`--resume`) finds the new sweep's pool."""

    def __init__(self, searcher: Searcher, sweep: str, search: str, slots: int, trials: int):
        super().__init__(searcher, max_concurrent=slots)
        self.sweep, self.search, self.trials, self.suggested = sweep, search, trials, 0
        self._pool = None

    def pool(self):
        if self._pool is None:
            self._pool = ray.get_actor(pool_name(self.sweep))
        return self._pool

    def suggest(self, trial_id: str) -> dict | None:
        if len(self.live_trials) >= self.max_concurrent:  # as ConcurrencyLimiter would refuse, but
            return None  # before taking a pool slot that another search may be asking for meanwhile
        if not ray.get(self.pool().acquire.remote(self.search, trial_id)):
            return None
        suggestion = super().suggest(trial_id)
        if suggestion in (None, Searcher.FINISHED):
            self.pool().release.remote(self.search, trial_id)
        else:
            self.suggested += 1
        if suggestion == Searcher.FINISHED or self.suggested >= self.trials:
            self.pool().satisfied.remote(self.search)
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.pool().release.remote(self.search, trial_id)
        super().on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        state = self.__dict__.copy()  # ConcurrencyLimiter's, without the actor handle
        del state["searcher"], state["_pool"]
        return copy.deepcopy(state)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


@contextmanager
def held_slot(sweep: str, search: str, key: str, poll_s: float = 1.0, most: int = 1):
    """Wait for one of the sweep's slots for work outside Tune (a search's control run, its seed
    replicates), take up to `most` as the pool allows then, hold them for the block (which is
    given their number), give them back."""
    pool = ray.get_actor(pool_name(sweep))
    while not ray.get(pool.acquire.remote(search, key)):
        time.sleep(poll_s)
    keys = [key]
    while len(keys) < most and ray.get(pool.acquire.remote(search, f"{key}-{len(keys)}")):
        keys.append(f"{key}-{len(keys)}")
    try:
        yield len(keys)
    finally:
        for held in keys:
            pool.release.remote(search, held)
