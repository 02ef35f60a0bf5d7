"""One rank of test_training.py's controller test: trains through the library API and, after every
optimizer step, checks that every rank holds the same router biases (gathered from all ranks)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from longcat.distributed.layout import init_layout
from longcat.training.config import TrainConfig
from longcat.training.trainer import Trainer


def main() -> None:
    data, out, ep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layout = init_layout(ep, "cpu")
    cfg = TrainConfig(preset="tiny", data_dir=data, max_steps=6, batch_size=4, seq_len=32, log_every=1,
                      eval_every=6, eval_batches=1, warmup_steps=2, mtp_start_step=2)  # fmt: skip
    trainer = Trainer(cfg, out, progress=False, layout=layout)
    step = trainer.controller.step
    mismatches = []

    def checked(layers, index):  # noqa: ANN001, ANN202
        report = step(layers, index)
        mine = torch.stack([moe.router.e_score_correction_bias.detach().clone() for moe in layers])
        every = [torch.empty_like(mine) for _ in range(layout.world)]
        dist.all_gather(every, mine)
        moved = not torch.equal(mine, torch.zeros_like(mine))
        mismatches.append({"step": index, "equal": all(torch.equal(every[0], b) for b in every), "moved": moved})
        return report

    trainer.controller.step = checked
    trainer.run()
    if layout.is_main:
        with open(f"{out}/bias_check.json", "w") as handle:
            json.dump(mismatches, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
