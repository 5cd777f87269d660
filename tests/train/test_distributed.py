"""Two CPU processes (gloo) train one model: parameters stay identical on both ranks, each rank
reads its own shard of the data, and only rank 0 writes."""

import os
import socket

import torch
import torch.multiprocessing as mp

from clasp.train import distributed as D
from clasp.train.data import ResumableSampler
from clasp.train.trainer import Trainer
from tests.utils import tiny_config

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, config: dict, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer = Trainer(config)
    assert isinstance(trainer.train_step.student, torch.nn.parallel.DistributedDataParallel)
    result = trainer.fit()
    student = torch.cat([p.detach().flatten() for p in trainer.train_step.model.parameters()])
    teacher = torch.cat([p.detach().flatten() for p in trainer.train_step.teacher.parameters()])
    torch.save(
        {"student": student, "teacher": teacher, "center": trainer.train_step.dino_loss.center,
         "step": result.step, "records": len(result.records)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )  # fmt: skip
    D.teardown()


def test_ddp_on_two_cpu_processes_keeps_ranks_identical(synth_root, label_cache, tmp_path):
    config = tiny_config(
        synth_root, str(tmp_path / "run"), label_cache,
        optim={"steps": 3}, data={"batch_size": 4}, train={"checkpoint_every": 2},
    )  # fmt: skip
    mp.spawn(run_rank, args=(config, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    for key in ("student", "teacher", "center"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["records"] == 3 and ranks[1]["records"] == 0  # only rank 0 logs
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["rng"]) == WORLD and checkpoint["step"] == 3
    saved = torch.cat([v.flatten() for v in checkpoint["model"].values()])
    assert torch.equal(saved, ranks[0]["student"])  # the whole final model, unwrapped


def test_sampler_shards_epochs_and_resumes_mid_epoch():
    data = list(range(50))
    samplers = [ResumableSampler(data, 4, 2, rank, seed=7) for rank in range(2)]
    for s in samplers:
        s.set_position(3, 0)
    epoch = [list(s) for s in samplers]
    assert all(e == 3 for shard in epoch for e, _ in shard)
    indices = [[i for _, i in shard] for shard in epoch]
    assert len(indices[0]) == len(indices[1]) == 6 * 4  # 25 per rank -> 6 whole batches
    assert not set(indices[0]) & set(indices[1])
    samplers[0].set_position(3, 4)  # after 4 batches of epoch 3
    assert [i for _, i in samplers[0]] == indices[0][16:]
    samplers[0].set_position(4, 0)
    assert [i for _, i in samplers[0]] != indices[0]
