"""Which tenant's train job goes out next: a pure object, driven by the step
machine (``core.SchedulerCore``).

Each tenant belongs to one trainer shard (``shard_of``). A tenant is *ready*
when its current step may train, *outstanding* while its job is out. Per
shard at most ``queue_depth`` jobs are outstanding; among the ready tenants
of a shard the one least recently trained goes first (then the one ready
longest), so a busy tenant cannot starve the others."""

from __future__ import annotations

from collections.abc import Callable

from services.scheduler.outgoing import shard_of


class Dispatcher:
    def __init__(self, num_shards: int, queue_depth: int) -> None:
        self.num_shards = max(1, num_shards)
        self.queue_depth = max(1, queue_depth)
        self.ready: dict[int, dict[str, int]] = {s: {} for s in range(self.num_shards)}  # tenant -> ready order
        self.outstanding: dict[int, set[str]] = {s: set() for s in range(self.num_shards)}
        self.last_trained: dict[str, int] = {}  # tenant -> release order of its last job
        self._order = 0  # monotonic counter for ready / release order

    def shard(self, experiment_id: str) -> int:
        return shard_of(experiment_id, self.num_shards)

    def reset(self) -> None:
        """Forget ready and outstanding tenants (a restart rebuilds them); the
        training order is kept, it only breaks ties."""
        for shard in range(self.num_shards):
            self.ready[shard].clear()
            self.outstanding[shard].clear()

    def mark_ready(self, experiment_id: str) -> None:
        ready = self.ready[self.shard(experiment_id)]
        if experiment_id not in ready:
            self._order += 1
            ready[experiment_id] = self._order

    def mark_outstanding(self, experiment_id: str) -> None:
        """Its job is out already (found so on recovery)."""
        self.outstanding[self.shard(experiment_id)].add(experiment_id)

    def trained(self, experiment_id: str) -> None:
        """Its job's version came back: the shard has room again."""
        self.outstanding[self.shard(experiment_id)].discard(experiment_id)

    def forget(self, experiment_id: str) -> None:
        shard = self.shard(experiment_id)
        self.outstanding[shard].discard(experiment_id)
        self.ready[shard].pop(experiment_id, None)
        self.last_trained.pop(experiment_id, None)

    def release(self, still_ready: Callable[[str], bool]) -> list[tuple[int, str]]:
        """The (shard, tenant) pairs whose jobs go out now, in order; each is
        outstanding from now on. A ready tenant that ``still_ready`` says no
        longer is (ended, or its job already out) is dropped."""
        released = []
        for shard, ready in self.ready.items():
            outstanding = self.outstanding[shard]
            while ready and len(outstanding) < self.queue_depth:
                experiment_id = min(ready, key=lambda t: (self.last_trained.get(t, 0), ready[t]))
                del ready[experiment_id]
                if not still_ready(experiment_id):
                    continue
                outstanding.add(experiment_id)
                self._order += 1
                self.last_trained[experiment_id] = self._order
                released.append((shard, experiment_id))
        return released
