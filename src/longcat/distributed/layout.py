"""The parallel layout: which ranks shard what (torchtitan's dp × (efsdp, ep) view of one world).

N ranks, all data-parallel (each trains on its share of the global batch). Dense parameters are
sharded with FSDP2 over all N ("dp" mesh). The N_FFN experts are split over E ranks ("ep": ranks
r, r+1, ..., r+E-1 for r a multiple of E, so an expert-parallel group sits on neighbouring ranks,
one node where possible), each holding N_FFN/E whole experts, and those expert weights are sharded
with FSDP2 over the N/E ranks that hold the same experts ("efsdp": ranks with the same position in
their EP group). E = 1 is plain FSDP2; E = N leaves the experts unsharded by FSDP.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("LONGCAT_DIST_TIMEOUT", "300")))


def check_layout(nproc: int, ep: int, num_experts: int | None = None) -> None:
    """Refuse a layout that cannot work, naming the flag and the fix (before any worker starts)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if ep < 1 or nproc % ep:
        raise ConfigError(f"--ep {ep} must divide --nproc {nproc} (expert-parallel groups of {ep} ranks)")
    if num_experts is not None and num_experts % ep:
        raise ConfigError(
            f"--ep {ep} must divide the model's {num_experts} FFN experts (n_routed_experts); "
            f"choose --ep among {[d for d in range(1, nproc + 1) if nproc % d == 0 and num_experts % d == 0]}"
        )


@dataclass
class Layout:
    rank: int
    world: int
    local_rank: int
    ep: int
    device: torch.device
    dp_mesh: DeviceMesh  # [N]: dense parameters, data parallelism
    expert_mesh: DeviceMesh  # [N / E, E] named ("efsdp", "ep")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.expert_mesh.get_group("ep")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_layout(ep: int, device_type: str) -> Layout:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
    build both meshes: gloo on CPU, NCCL on CUDA."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_layout(world, ep)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        # the launcher's store outlives a restart of the workers (--max-restarts): keys under a prefix of
        # this attempt, so a restarted rank never reads the address a dead rank published
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                               is_master=not hosted and rank == 0, timeout=TIMEOUT)  # fmt: skip
        store = dist.PrefixStore(f"longcat/attempt_{attempt}", client)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    dp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    expert_mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return Layout(rank, world, local_rank, ep, device, dp_mesh, expert_mesh)


def in_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
