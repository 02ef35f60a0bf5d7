"""Hugging Face-format checkpoints: `config.json` + safetensors with the exact `longcat_flash` key names.

In memory the FFN experts of a layer are two stacked tensors (`mlp.experts.gate_up_proj [N, 2I, H]`,
`mlp.experts.down_proj [N, H, I]`); on disk each expert has its own keys
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), the layout of the released checkpoints and of
transformers 4.57 and 5.x. `expert_keys` / `stacked_param_name` are that one conversion, used both ways.
Zero experts have no weights in the released layout; transformers 5.0-5.24 alone wanted all-zero rows
for them (`zero_expert_stubs`, `transformers_needs_zero_expert_stubs`).

Loading reads every file header first and checks the complete key set and every shape before a single
value is copied into a freshly built model, so a bad checkpoint raises `CheckpointError` naming the
tensor and nothing loads half-way. Saving writes each file under a temporary name and renames it.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ConfigError, LongcatConfig

if TYPE_CHECKING:
    from .model.lm import LongcatForCausalLM

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """A checkpoint directory or file is missing, corrupt or does not match the config."""


class ZeroExpertRowsIgnored(UserWarning):
    """A checkpoint carries gate/up rows for zero experts (transformers 5.0-5.24 layout); they were skipped."""


# ----- the one expert-layout conversion -------------------------------------------------------
def expert_keys(prefix: str, num_experts: int) -> Iterator[tuple[str, int, str]]:
    """Disk keys of a stacked expert block `prefix` (e.g. `model.layers.0.mlp.experts`):
    yields (key, expert index, projection name)."""
    for e in range(num_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{prefix}.{e}.{proj}.weight", e, proj


def expert_slice(stacked: dict[str, torch.Tensor], proj: str, e: int, width: int) -> torch.Tensor:
    """The [out, in] view of one expert's projection inside the stacked tensors (no copy)."""
    if proj == "down_proj":
        return stacked["down_proj"][e]
    rows = slice(0, width) if proj == "gate_proj" else slice(width, 2 * width)
    return stacked["gate_up_proj"][e, rows]


def _stacked_blocks(model: LongcatForCausalLM) -> dict[str, dict[str, torch.Tensor]]:
    """Module prefix -> {"gate_up_proj": tensor, "down_proj": tensor} for every expert block."""
    from .model.moe import Experts

    return {
        name: {"gate_up_proj": module.gate_up_proj, "down_proj": module.down_proj}
        for name, module in model.named_modules()
        if isinstance(module, Experts)
    }


def disk_layout(model: LongcatForCausalLM) -> dict[str, tuple[tuple[int, ...], str, tuple | None]]:
    """Every key a checkpoint of `model` holds: key -> (shape, in-memory name, expert (e, proj) or None)."""
    blocks = _stacked_blocks(model)
    width = model.config.expert_ffn_hidden_size
    layout: dict[str, tuple[tuple[int, ...], str, tuple | None]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in blocks:
            if leaf == "gate_up_proj":  # one entry per block, covering both stacked tensors
                for key, e, proj in expert_keys(prefix, blocks[prefix]["down_proj"].shape[0]):
                    shape = tuple(expert_slice(blocks[prefix], proj, e, width).shape)
                    layout[key] = (shape, prefix, (e, proj))
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        layout[name] = (tuple(tensor.shape), name, None)
    return layout


# ----- saving ---------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or 2000000")
    unit = (match.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * factor)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk through a read-only descriptor (works for read-only files too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:  # noqa: ANN001 - write(tmp_path) callback
    """Write through a temporary file in the same directory, flushed to disk, then rename it over
    `path`, so a crash leaves the old file or the new one, never half of one. The temporary file is
    created with open() rather than mkstemp, and its mode restored after write() (safetensors makes
    its file private to the owner), so the result has the usual (umask) permissions."""
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        open(tmp, "xb").close()  # noqa: SIM115 - claims the name; write() fills it
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _warn_where_transformers_differs(config: LongcatConfig) -> None:
    """transformers' longcat_flash does not model these settings (checkpoint-contract §2.2): it always
    applies both MLA scales, never renormalises the top-k gates and treats zero experts as identity."""
    differs = [
        name
        for name, odd in (
            ("mla_scale_q_lora=False", not config.mla_scale_q_lora),
            ("mla_scale_kv_lora=False", not config.mla_scale_kv_lora),
            ("norm_topk_prob=True", config.norm_topk_prob),
            ("zero_expert_type='drop'", config.zero_expert_type == "drop" and config.zero_expert_num > 0),
        )
        if odd
    ]
    if differs:
        warnings.warn(
            f"this config has {', '.join(differs)}, which transformers' longcat_flash ignores: the checkpoint "
            "loads there but computes differently (it loads here, and in the remote code, as saved)",
            stacklevel=3,
        )


def transformers_needs_zero_expert_stubs(version: str) -> bool:
    """Whether transformers `version` loads only checkpoints with zero-expert stub rows.

    transformers 5.0 through 5.24 size `LongcatFlashExperts.gate_up_proj` for all N + Z experts and
    refuse the released layout; 4.57 and 5.25 on size it for the N FFN experts and refuse the stubs.
    A pre-release of 5.25 (`5.25.0.dev0`) is counted as 5.25: the change landed on its main branch."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"transformers version {version!r}: expected MAJOR.MINOR[...]")
    major, minor = int(match[1]), int(match[2])
    return major == 5 and minor < 25


def installed_transformers_version() -> str | None:
    """The installed transformers' version, read from its metadata without importing it; None if absent."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def save_pretrained(
    model: LongcatForCausalLM,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    zero_expert_stubs: bool = False,
) -> None:
    """Write config.json and safetensors shards (with an index above max_shard_size) into `path`.

    The default layout is the released one (no weights for zero experts), which transformers 4.57 and
    >= 5.25, vLLM and SGLang read. transformers 5.0-5.24 size their fused `gate_up_proj` for all N + Z
    experts and refuse a checkpoint without rows for the zero experts (the released 560B one
    included); zero_expert_stubs=True adds all-zero `gate_proj`/`up_proj` weights for them, as those
    versions themselves write, so it loads there (and nowhere else in transformers). They cost
    2 * Z * I * H values per layer. `transformers_needs_zero_expert_stubs` tells which a version reads.

    Other files in `path` (a tokenizer, say) are kept; weight files of an earlier save that the new
    one does not use are removed after the new ones are in place."""
    from safetensors.torch import save_file

    _warn_where_transformers_differs(model.config)
    limit = _parse_size(max_shard_size)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    layout = disk_layout(model)
    blocks = _stacked_blocks(model)
    state = model.state_dict()
    width = model.config.expert_ffn_hidden_size

    stubs: dict[str, torch.Tensor] = {}
    if zero_expert_stubs:
        config = model.config
        stub = torch.zeros(width, config.hidden_size, dtype=model.dtype)
        for prefix in blocks:
            for e in range(config.n_routed_experts, config.num_experts_total):
                for proj in ("gate_proj", "up_proj"):
                    stubs[f"{prefix}.{e}.{proj}.weight"] = stub

    def tensor_for(key: str) -> torch.Tensor:
        if key in stubs:
            return stubs[key]
        _shape, name, expert = layout[key]
        if expert is None:
            return state[name]
        return expert_slice(blocks[name], expert[1], expert[0], width)

    shards: list[list[str]] = [[]]
    sizes = [0]
    for key in [*layout, *stubs]:
        nbytes = tensor_for(key).numel() * tensor_for(key).element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(key)
        sizes[-1] += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for keys, name in zip(shards, names):
        # a copy per tensor: safetensors refuses views sharing storage (the expert slices do)
        tensors = {key: tensor_for(key).detach().to("cpu", copy=True).contiguous() for key in keys}
        _write_atomic(out / name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        del tensors
    dtype = str(model.dtype).removeprefix("torch.")
    config_dict = model.config.to_dict()
    config_dict["torch_dtype"] = dtype
    _write_atomic(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2) + "\n"))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {key: name for keys, name in zip(shards, names) for key in keys},
        }
        _write_atomic(out / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    for stale in out.glob("model*.safetensors*"):
        if stale.name not in names and not (len(shards) > 1 and stale.name == INDEX_FILE):
            stale.unlink()


# ----- loading --------------------------------------------------------------------------------
def resolve_checkpoint_dir(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory, or a Hugging Face Hub id downloaded with huggingface_hub where installed."""
    local = Path(path)
    if local.is_dir():
        return local
    text = str(path)
    if local.exists():
        raise CheckpointError(f"{text} is a file; pass the checkpoint directory that holds config.json")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as err:
            raise CheckpointError(
                f"{text} is not a local directory; to fetch it from the Hugging Face Hub install "
                "huggingface_hub (pip install huggingface_hub)"
            ) from err
        config_only = Path(snapshot_download(text, revision=revision, allow_patterns=[CONFIG_NAME]))
        if (config_only / CONFIG_NAME).is_file():
            refuse_quantised(config_only / CONFIG_NAME)  # before downloading the weights
        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    raise CheckpointError(f"checkpoint directory {text} does not exist")


def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}); restore it") from err
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    if any(root.glob("*.bin")):
        raise CheckpointError(
            f"{root} has only PyTorch .bin weights; re-save it with safetensors "
            "(transformers: save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{root} holds no *.safetensors weights: it is not a checkpoint directory")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, stored dtype such as "BF16"), from the headers only; a truncated or corrupt
    file raises here."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for file in files:
        size = file.stat().st_size
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                end = 0
                for key in keys:
                    if key in found:
                        raise CheckpointError(f"tensor {key} appears in both {found[key][0].name} and {file.name}")
                    piece = handle.get_slice(key)
                    found[key] = (file, tuple(piece.get_shape()), str(piece.get_dtype()))
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({err}); re-download or re-save it"
            ) from err
        # safetensors accepts a file whose data section is shorter than its header promises until
        # a tensor is read; check the promised length against the file now.
        with open(file, "rb") as raw:
            header_len = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise CheckpointError(
                f"{file} is truncated: its header promises {8 + header_len + end} bytes, the file has {size}; "
                "re-download or re-save it"
            )
    return found


_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def refuse_quantised(config_path: Path) -> None:
    """Quantised releases (FP8 weights with block scales) are not supported: say so from config.json
    alone, before any weights are read or downloaded."""
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # reading the config properly reports it
    quant = data.get("quantization_config") or data.get("quant_config") if isinstance(data, dict) else None
    if quant:
        method = quant.get("quant_method", "quantised") if isinstance(quant, dict) else "quantised"
        raise CheckpointError(
            f"{config_path.parent} is a {method} checkpoint (quantization_config in config.json); only unquantised "
            "float32/float16/bfloat16 weights load here: use the bf16 release, e.g. meituan-longcat/LongCat-Flash-Chat"
        )


def _resolve_dtype(dtype: torch.dtype | str | None, config: LongcatConfig, stored: str | None = None) -> torch.dtype:
    """ "auto": the config's torch_dtype, else the dtype the embedding is stored in (as transformers does)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if config.torch_dtype in _DTYPES:
            return _DTYPES[config.torch_dtype]
        return _STORED_DTYPES.get(stored or "F32", torch.float32)
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not one of 'auto', {sorted(_DTYPES)} or a torch.dtype")


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def load_pretrained(
    cls: type[LongcatForCausalLM],
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = "auto",
    revision: str | None = None,
) -> LongcatForCausalLM:
    from safetensors import safe_open

    root = resolve_checkpoint_dir(path, revision)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{root} has no {CONFIG_NAME}: it is not a checkpoint directory")
    refuse_quantised(config_path)
    try:
        config = LongcatConfig.from_json_file(config_path)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from err
    found = _read_headers(_weight_files(root))
    unsupported = sorted({dtype for _file, _shape, dtype in found.values()} - _STORED_DTYPES.keys())
    if unsupported:
        raise CheckpointError(
            f"{root} stores tensors as {', '.join(unsupported)}; only float64/32/16 and bfloat16 weights load "
            "here (an FP8 release needs its bf16 counterpart, e.g. meituan-longcat/LongCat-Flash-Chat)"
        )

    has_mtp = any(key.startswith("model.mtp.") for key in found)
    if has_mtp and config.num_nextn_predict_layers == 0:
        # as transformers does: a config without an MTP layer ignores the MTP weights
        warnings.warn(
            f"{root}: num_nextn_predict_layers is 0, so the model.mtp.* weights are not loaded",
            stacklevel=2,
        )
        found = {key: value for key, value in found.items() if not key.startswith("model.mtp.")}
        has_mtp = False
    if config.num_nextn_predict_layers > 0 and not has_mtp:
        # transformers drops model.mtp.* on load and so never saves it: load the main model alone
        warnings.warn(
            f"{root} has no MTP weights (model.mtp.*); loading without the MTP module, "
            "so MTP speculative decoding is unavailable for it",
            stacklevel=2,
        )
        config.num_nextn_predict_layers = 0
    embedding = found.get("model.embed_tokens.weight")
    target_dtype = _resolve_dtype(dtype, config, embedding[2] if embedding else None)
    model = cls(config, device="meta", dtype=target_dtype)
    layout = disk_layout(model)

    n_ffn, n_total = config.n_routed_experts, config.num_experts_total
    phantom, unexpected = [], []
    for key in found.keys() - layout.keys():
        match = _EXPERT_KEY.match(key)
        # transformers 5.0-5.24 write gate/up weights for the zero (identity) experts: never used
        if match and n_ffn <= int(match.group(2)) < n_total and match.group(3) != "down_proj":
            phantom.append(key)
        else:
            unexpected.append(key)
    missing = sorted(layout.keys() - found.keys())
    if missing:
        raise CheckpointError(
            f"{root}: {len(missing)} tensor(s) the config needs are missing: {_summarise(missing)}. "
            "Check that config.json belongs to these weights"
        )
    if unexpected:
        raise CheckpointError(
            f"{root}: {len(unexpected)} tensor(s) the config does not expect: {_summarise(unexpected)}. "
            "Check that config.json belongs to these weights"
        )
    if phantom:
        warnings.warn(
            f"{root}: ignoring {len(phantom)} zero-expert weight(s), the rows transformers 5.0-5.24 keep for identity "
            f"experts (e.g. {sorted(phantom)[0]}); identity experts have no weights",
            ZeroExpertRowsIgnored,
            stacklevel=2,
        )
    for key, (shape, _name, _expert) in layout.items():
        if found[key][1] != shape:
            raise CheckpointError(
                f"tensor {key} in {found[key][0].name} has shape {list(found[key][1])}, "
                f"the config needs {list(shape)}; check that config.json belongs to these weights"
            )

    target = torch.device(device) if device is not None else torch.get_default_device()
    model.to_empty(device=target)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers()
    params = dict(model.state_dict(keep_vars=True))
    blocks = _stacked_blocks(model)
    width = config.expert_ffn_hidden_size
    by_file: dict[Path, list[str]] = {}
    for key in layout:
        by_file.setdefault(found[key][0], []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in keys:
                    _shape, name, expert = layout[key]
                    dest = params[name] if expert is None else expert_slice(blocks[name], expert[1], expert[0], width)
                    dest.copy_(handle.get_tensor(key))
    return model
