"""Scale-out on PyTorch's own distributed stack, applied to a built model from the outside: the model
files stay single-device (../shared/DESIGN.md). Every collective lives in this package.

Built so far: expert parallelism (expert_parallel.py: the all-to-all token dispatcher that the ScMoE
layer overlaps with its dense path). Not yet: the FSDP2 layout, distributed checkpoints, the
launcher and the trainer's use of them; `longcat train` runs in one process.
"""
