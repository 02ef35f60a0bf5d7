"""One rank of test_training.py's router-precision test: the bf16 FSDP2 policy with EP 2; a forward
pre-hook on every router records whether its classifier weight arrives as the fp32 master, bit for bit."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from longcat.distributed.collectives import full
from longcat.distributed.layout import init_layout
from longcat.training.config import TrainConfig
from longcat.training.trainer import Trainer


def main() -> None:
    data, out, ep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layout = init_layout(ep, "cpu")
    cfg = TrainConfig(preset="tiny", data_dir=data, max_steps=1, batch_size=4, seq_len=32, dtype="bfloat16",
                      eval_every=10, warmup_steps=1)  # fmt: skip
    trainer = Trainer(cfg, out, progress=False, layout=layout)
    masters = [full(moe.router.classifier.weight).detach().clone() for moe in trainer.model.moe_layers()]
    seen = []

    def check(index: int):  # noqa: ANN202
        def hook(module, args) -> None:  # noqa: ANN001
            weight = module.classifier.weight
            equal = bool(torch.equal(weight, masters[index]))
            seen.append({"layer": index, "dtype": str(weight.dtype), "equal": equal})

        return hook

    for index, moe in enumerate(trainer.model.moe_layers()):
        moe.router.register_forward_pre_hook(check(index))
    trainer.train_step(monitor=False)
    if layout.is_main:
        with open(f"{out}/router_check.json", "w") as handle:
            json.dump(seen, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
