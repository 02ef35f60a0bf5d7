"""Training checkpoints that a run killed at any moment resumes from exactly.

`checkpoints/step_N/` is a Hugging Face-format model directory (so `from_pretrained` and transformers
read it) plus `trainer_state.pt`: optimizer, data position, RNG states and counters. The model holds the
expert selection biases, the controller's only state besides its schedule, which is a function of the
step. A checkpoint is written under a temporary name and renamed, so a directory named `step_N`
is always complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import fsync_file

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ASIDE_DIR = re.compile(r"^\.step_(\d+)\.old$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path, model, trainer_state: dict, extra_files: list[Path], zero_expert_stubs: bool = False
) -> Path:  # noqa: ANN001
    """Write `directory` atomically: a temporary sibling, flushed to disk, then renamed. An existing
    checkpoint of that name is first renamed aside and deleted only after the new one is in place, so a
    crash leaves one complete checkpoint under the name (or the old one aside), never a partial one."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, zero_expert_stubs=zero_expert_stubs)
    for file in extra_files:
        shutil.copy2(file, tmp / file.name)
    torch.save(trainer_state, tmp / STATE_FILE)
    for path in tmp.iterdir():  # the weights are fsynced by save_pretrained; the rest here
        fsync_file(path)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    with contextlib.suppress(OSError):  # makes the renames durable (POSIX); not every platform opens directories
        fsync_file(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}  # .step_N.old: the previous step_N, if a re-save died before replacing it
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name) or _ASIDE_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            (found if path.name.startswith("step_") else aside)[int(match.group(1))] = path
    for step, path in aside.items():
        found.setdefault(step, path)
    return sorted(found.items())


def prune_checkpoints(root: Path, keep: int) -> None:
    for _step, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(directory: Path) -> dict:
    # on the CPU first: a state saved on a GPU loads anywhere; the optimizer moves it to its parameters
    return torch.load(directory / STATE_FILE, weights_only=False, map_location="cpu")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric rows written after `last_step` (by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row cut short by the kill
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
