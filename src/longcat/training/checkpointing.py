"""Training checkpoints that a run killed at any moment resumes from exactly.

`checkpoints/step_N/` holds `state/`, the model's and the optimizer's tensors as a distributed
checkpoint that every rank writes its own part of and that loads at any world size or EP size
(distributed/checkpoint.py); `trainer_state.pt`: data position, RNG states, counters and the settings;
`config.json` and the tokenizer, so `longcat export` turns it into a Hugging Face directory. The model
holds the expert selection biases, the controller's only state besides its schedule, which is a
function of the step. A checkpoint is written under a temporary name and renamed, so a directory
named `step_N` is always complete.

`trainer_state.pt` holds tensors, numbers, strings and containers of them only, and is read with
`torch.load(weights_only=True)`: a state file from elsewhere cannot run code on load, and one that
holds anything else is refused. The RNG states are stored as tensors for that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import fsync_file, installed_transformers_version, transformers_needs_zero_expert_stubs
from ..data.prepare import copy_tokenizer

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ASIDE_DIR = re.compile(r"^\.step_(\d+)\.old$")
# what a state file must hold (more keys are allowed and ignored)
STATE_KEYS = ("step", "loader", "rng", "skipped", "consecutive_bad", "tokens_seen", "train_config")


class StateFileError(RuntimeError):
    """A trainer state file is unreadable, tampered with or of another layout; the message names it."""


def rng_state() -> dict:
    """Every RNG a training step draws from, as tensors and numbers (weights-only loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


SHARDS_DIR = "state"


def checkpoint_tmp(directory: Path) -> Path:
    """Where `directory` is written before it is renamed into place."""
    return directory.with_name(f".{directory.name}.tmp")


def begin_checkpoint(directory: Path) -> Path:
    """Rank 0, before every rank writes its shards into the returned directory's SHARDS_DIR."""
    tmp = checkpoint_tmp(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(directory: Path, trainer_state: dict, config, extra_files: list[Path]) -> Path:  # noqa: ANN001
    """Rank 0, once every rank has written its shards: the small files, everything flushed to disk, then
    the rename. An existing checkpoint of that name is first renamed aside and deleted only after the
    new one is in place, so a crash leaves one complete checkpoint under the name (or the old one
    aside), never a partial one."""
    tmp = checkpoint_tmp(directory)
    old = directory.with_name(f".{directory.name}.old")
    config.to_json_file(tmp / "config.json")
    copy_tokenizer(extra_files, tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    for path in (*tmp.iterdir(), *(tmp / SHARDS_DIR).iterdir()):
        fsync_file(path)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    with contextlib.suppress(OSError):  # makes the renames durable (POSIX); not every platform opens directories
        fsync_file(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


# 1: no environment.json, HF-format step checkpoints with a pickled trainer state; 2: environment.json,
# distributed step checkpoints with a weights-only trainer state, expert stacks stored expert by expert;
# 3: expert stacks stored whole by their global shape (distributed/checkpoint.py)
RUN_FORMAT_VERSION = 3
ENVIRONMENT_FILE = "environment.json"


def run_format(run_dir: Path) -> int | None:
    """The layout version of a run directory: None for one that holds no run yet, 1 for one written
    before run directories carried a version (checkpoints but no environment.json)."""
    path = run_dir / ENVIRONMENT_FILE
    if path.is_file():
        try:
            version = json.loads(path.read_text(encoding="utf-8")).get("run_format_version")
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise StateFileError(f"{path} is unreadable ({err}); it records the run's layout version") from err
        if not isinstance(version, int):
            raise StateFileError(f"{path} has no integer run_format_version")
        return version
    return 1 if list_checkpoints(run_dir / "checkpoints") else None


def write_environment(run_dir: Path, record: dict, step: int, amend: bool = False) -> None:
    """environment.json: the layout version and what bitwise reproducibility depends on (determinism.py).
    A resume under another environment keeps the earlier records, each with the step it ran until;
    amend=True corrects the current record instead (what the first step found it ran)."""
    path = run_dir / ENVIRONMENT_FILE
    data = {"run_format_version": RUN_FORMAT_VERSION, "reproducibility": record, "earlier": []}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        data["earlier"] = old.get("earlier", [])
        if not amend and old.get("reproducibility") not in (None, record):
            data["earlier"].append({"until_step": step, "reproducibility": old["reproducibility"]})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, path)


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
    """The state file of one checkpoint, loaded weights-only onto the CPU (a state saved on a GPU loads
    anywhere; the optimizer moves it to its parameters)."""
    path = directory / STATE_FILE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        first = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise StateFileError(
            f"{path} is not a trainer state this version can read safely ({first}); it may be damaged, written "
            "by an older longcat, or tampered with. Resume only run directories you trust; the model in "
            f"{directory} (safetensors) still loads with from_pretrained"
        ) from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise StateFileError(f"{path} lacks {', '.join(missing)}: it is not a longcat trainer state")
    return state


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


def checkpoint_dir(source: Path) -> Path:
    """A step checkpoint directory, or a run directory's latest complete checkpoint."""
    if (source / STATE_FILE).is_file():
        return source
    found = list_checkpoints(source / "checkpoints")
    if not found:
        raise StateFileError(f"{source} is neither a step checkpoint (no {STATE_FILE}) nor a run directory with one")
    return found[-1][1]


def load_checkpoint_model(directory: Path):  # noqa: ANN201 - LongcatForCausalLM
    """The model of one step checkpoint, in one process on the CPU (from any layout's checkpoint)."""
    from ..config import LongcatConfig
    from ..distributed.checkpoint import checkpoint_state, load
    from ..model.lm import LongcatForCausalLM

    model = LongcatForCausalLM(LongcatConfig.from_json_file(directory / "config.json"), device="cpu", seed=0)
    load(directory / SHARDS_DIR, checkpoint_state(model, None))
    return model


def warn_if_stubs_are_refused(final: Path) -> None:
    """A run that writes zero-expert stub rows into final/ (export_zero_expert_stubs=true: the default
    of runs started before the released layout became it) is told when the installed transformers would
    refuse them, and how to get the released layout."""
    version = installed_transformers_version()
    if version is not None and not transformers_needs_zero_expert_stubs(version):
        warnings.warn(
            f"final/ gets zero-expert stub rows (export_zero_expert_stubs=true in train_config.json), which the "
            f"installed transformers {version} refuses (only 5.0-5.24 read them); `longcat export {final} --out "
            "DIR` writes the released layout, or resume with --set export_zero_expert_stubs=false",
            stacklevel=3,
        )


def export_checkpoint(source: Path, out: Path, zero_expert_stubs: bool = False) -> Path:
    """A step checkpoint (or a run's latest), or a Hugging Face directory such as a run's `final/`,
    as a Hugging Face directory with its tokenizer, written under a temporary name and renamed.

    The layout is the released one unless zero_expert_stubs (for transformers 5.0-5.24 only,
    checkpoint.save_pretrained); exporting a `final/` converts between the two layouts."""
    from ..checkpoint import CONFIG_NAME
    from ..model.lm import LongcatForCausalLM

    if (source / CONFIG_NAME).is_file() and not (source / STATE_FILE).is_file():
        directory = source
        model = LongcatForCausalLM.from_pretrained(source, device="cpu")
    else:
        directory = checkpoint_dir(source)
        model = load_checkpoint_model(directory)
    if out.resolve() == directory.resolve():
        raise StateFileError(f"--out {out} is the source itself: export writes a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, zero_expert_stubs=zero_expert_stubs)
    names = ("tokenizer.json", "tokenizer_config.json")
    copy_tokenizer([directory / name for name in names if (directory / name).is_file()], tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
