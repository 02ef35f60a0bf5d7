"""One rank of the expert-parallel test (test_expert_parallel.py starts WORLD of these): the whole
model, its experts split over the ranks, forward and backward on this rank's own batch."""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from tests.conftest import perturb, random_tiny_config
from tests.op_counts import host_reads

from longcat import LongcatForCausalLM
from longcat.distributed.collectives import local
from longcat.distributed.expert_parallel import AllToAllTokenDispatcher, apply_expert_parallel
from longcat.model import tuning


def batch(rank: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(100 + rank))


def build() -> LongcatForCausalLM:
    model = LongcatForCausalLM(random_tiny_config(3, n_routed_experts=4, zero_expert_num=2, moe_topk=3), seed=0)
    perturb(model, 0)
    return model


def main() -> None:
    rank, world, port, out, overlap = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    model = build()
    timer = apply_expert_parallel(model.moe_layers(), dist.group.WORLD, overlap=overlap)
    dispatch_reads = []  # the host reads of each dispatch
    dispatch = AllToAllTokenDispatcher.dispatch

    def counted(self, *args):  # noqa: ANN001, ANN002, ANN202
        tuning.ACCELERATOR_PATH = True  # the dispatch as on a GPU (the CPU's own sort reads through numpy)
        with host_reads() as reads:
            handle = dispatch(self, *args)
        tuning.ACCELERATOR_PATH = None
        dispatch_reads.append(dict(reads))
        return handle

    AllToAllTokenDispatcher.dispatch = counted
    ids = batch(rank, model.config.vocab_size)
    result = model(ids, labels=ids)
    result.loss.backward()
    grads = {name: local(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"logits": result.logits.detach(), "loss": result.loss.detach(), "grads": grads,
                "waits": timer.waits, "dispatch_reads": dispatch_reads}, f"{out}/rank{rank}.pt")  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
