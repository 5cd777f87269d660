"""The identity sampler of metric learning: batches of P identities x K images each.

It follows `clasp.train.data.ResumableSampler`'s protocol, so the training loop resumes it
mid-epoch: it yields (epoch, index) pairs, `set_position(epoch, batch)` starts an epoch
after that many batches, `batch_size` is P x K, and an epoch's batches are a pure function of
(seed, epoch), divided over the ranks (batch b goes to rank b mod world size).
"""

from __future__ import annotations

import numpy as np


class IdentitySampler:
    """PK batches, as TransReID's RandomIdentitySampler builds them: per epoch each identity's
    images are shuffled (an identity with fewer than K is drawn K times with replacement) and
    cut into groups of K (a remainder is dropped); while P identities still have a group, P of
    them are drawn at random and one group of each makes a batch."""

    def __init__(
        self,
        pids: list[int],
        identities_per_batch: int,
        instances_per_identity: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        self.p, self.k = int(identities_per_batch), int(instances_per_identity)
        if self.p < 2 or self.k < 1:
            raise ValueError(
                f"an identity batch needs P >= 2 identities of K >= 1 images, got P={self.p}, "
                f"K={self.k}"
            )
        self.batch_size = self.p * self.k
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        by_pid: dict[int, list[int]] = {}
        for index, pid in enumerate(pids):
            if pid >= 0:
                by_pid.setdefault(int(pid), []).append(index)
        self.by_pid = {pid: np.array(ix) for pid, ix in sorted(by_pid.items())}
        if len(self.by_pid) < self.p:
            raise ValueError(
                f"{len(self.by_pid)} training identities cannot fill a batch of P={self.p} "
                "identities; lower data.batch_size or raise data.instances_per_id"
            )
        self.epoch, self.start_batch = 0, 0
        self._batches = self.epoch_batches(0)
        if not self._batches:
            raise ValueError(
                f"one epoch of {len(self.by_pid)} identities makes no batch for each of "
                f"{num_replicas} process(es); lower data.batch_size"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch`, each P x K dataset indices."""
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict[int, list[np.ndarray]] = {}
        for pid, indices in self.by_pid.items():
            if len(indices) < self.k:
                order = rng.choice(indices, self.k, replace=True)
            else:
                order = rng.permutation(indices)
            n = len(order) // self.k
            groups[pid] = [order[i * self.k : (i + 1) * self.k] for i in range(n)]
        available = [pid for pid in groups if groups[pid]]
        batches = []
        while len(available) >= self.p:
            chosen = rng.choice(len(available), self.p, replace=False)
            pids = [available[i] for i in chosen]
            batches.append(np.concatenate([groups[pid].pop() for pid in pids]))
            available = [pid for pid in available if groups[pid]]
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def set_position(self, epoch: int, start_batch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batches = epoch, self.epoch_batches(epoch)
        self.start_batch = min(start_batch, len(self._batches))

    def __iter__(self):
        for batch in self._batches[self.start_batch :]:
            for index in batch.tolist():
                yield self.epoch, index

    def __len__(self) -> int:
        return (len(self._batches) - self.start_batch) * self.batch_size
