"""One rank of test_uneven_gradients.py: rank 1 holds no gradient for one module; each function that
reduces gradients over the ranks must still return on both (the test's timeout catches a hang)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from longcat.model.router import Routing
from longcat.training.optim import clip_gradients
from longcat.training.stability import grad_norm_ratio, small_gradient_share


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for i, p in enumerate(model.parameters()):
        if rank == 0 or i < 2:  # rank 1: no gradient for the second Linear
            p.grad = torch.full_like(p, 0.5 * (i + 1))
    result = {"norm": float(clip_gradients(list(model.parameters()), 1.0))}
    result["small_share"] = small_gradient_share(model, 1e-16)
    # the gradient-norm ratio over two layers' routings, the second without a gradient on rank 1
    probs = [torch.softmax(torch.randn(6, 5), -1).requires_grad_() for _ in range(2)]
    for i, p in enumerate(probs):
        if rank == 0 or i == 0:
            p.grad = torch.randn_like(p)
    routings = [(Routing(p, torch.zeros(6, 2, dtype=torch.long), p[:, :2]), torch.ones(2)) for p in probs]
    result["grad_norm_ratio"] = grad_norm_ratio(routings, lb_alpha=0.01, grad_accum=1, lb_groups=1, num_ffn=4)
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
