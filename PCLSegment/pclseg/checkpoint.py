"""Checkpoints as safetensors + JSON pairs: atomic to write, never unpickled to read.

A pair ``STEM.safetensors`` + ``STEM.json`` holds tensors and their metadata. The JSON carries
``format`` (what kind of pair), ``format_version``, ``versions`` (pclseg, torch, monai, python),
the caller's metadata (configs, epoch, ...) and the ``sha256`` of the safetensors file, so a
truncated file or a pair mixed from two saves is caught before anything is used.

Writing a pair never leaves a folder without a complete pair, whenever the writer is killed:

1. both new files are written to temporary files in the same folder and fsynced;
2. the pair on disk is kept as ``STEM.previous.safetensors`` + ``STEM.previous.json`` (hard
   links, weights first, so the old files stay where they are);
3. the new files are renamed over the old ones, safetensors first and JSON last;
4. the folder is fsynced and the previous pair removed.

A kill between the renames of step 3 leaves new weights beside old JSON, a pair whose sha256
does not match; :func:`load_pair` then loads the previous pair, the last complete one, so a
``--resume`` continues from it. (If a save finds a previous pair still there, the last save was
interrupted; the pair on disk becomes the fallback only if its sha256 matches, otherwise the
older complete pair stays the fallback.)

Optimizer state and random-number-generator state become tensors + JSON-ready metadata here
too, so a full training state can be saved and resumed without pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import __version__
from .errors import PCLSegError

#: Bumped when the layout of a pair changes incompatibly; older readers refuse newer pairs.
FORMAT_VERSION = 1
#: Keys :func:`save_pair` writes itself; callers' metadata may not set them.
RESERVED_KEYS = ("sha256", "format_version", "versions")

Tensors = dict[str, torch.Tensor]


def versions() -> dict[str, str]:
    """Versions of the software that wrote a checkpoint (read without importing monai)."""
    try:
        monai_version = importlib_metadata.version("monai")
    except importlib_metadata.PackageNotFoundError:
        monai_version = "absent"
    return {
        "pclseg": __version__,
        "torch": torch.__version__,
        "monai": monai_version,
        "python": platform.python_version(),
    }


def pair_paths(stem: Path | str) -> tuple[Path, Path]:
    """``(STEM.safetensors, STEM.json)``; a path to either file names its pair too."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def previous_stem(stem: Path | str) -> Path:
    """``STEM.previous``: where :func:`save_pair` keeps the last complete pair while it writes."""
    weights_path, _ = pair_paths(stem)
    return weights_path.with_name(weights_path.name.removesuffix(".safetensors") + ".previous")


def _staged(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temporary file beside ``path``, ready to be renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    os.replace(_staged(path, data), path)


def _keep(source: Path, target: Path) -> None:
    """Make ``target`` the same content as ``source`` without touching ``source``: a hard link
    renamed into place, or a fsynced copy where the file system has no hard links."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        _write_atomic(target, source.read_bytes())
        return
    os.replace(tmp, target)


def _matches(stem: Path) -> bool:
    """Whether ``STEM.json``'s sha256 is that of ``STEM.safetensors``."""
    weights_path, json_path = pair_paths(stem)
    try:
        recorded = json.loads(json_path.read_text(encoding="utf-8")).get("sha256")
        return hashlib.sha256(weights_path.read_bytes()).hexdigest() == recorded
    except (OSError, ValueError, AttributeError):
        return False


def _keep_fallback(stem: Path) -> None:
    """Step 2 of a save (module docstring): keep the complete pair on disk as ``STEM.previous``."""
    weights_path, json_path = pair_paths(stem)
    if not (weights_path.is_file() and json_path.is_file()):
        return  # nothing saved yet, or a first save was cut: nothing complete to keep
    old = previous_stem(stem)
    if pair_paths(old)[1].is_file() and not _matches(stem):
        return  # the last save was cut between its renames: the older pair is the complete one
    old_weights, old_json = pair_paths(old)
    _keep(weights_path, old_weights)
    _keep(json_path, old_json)


def _drop_fallback(stem: Path) -> None:
    """Step 4 of a save: the new pair is complete, so the previous one goes (JSON first), and
    so do temporary files a killed save of this pair left behind."""
    old_weights, old_json = pair_paths(previous_stem(stem))
    old_json.unlink(missing_ok=True)
    old_weights.unlink(missing_ok=True)
    for path in (*pair_paths(stem), old_weights, old_json):
        for stale in (*path.parent.glob(f".{path.name}.*.tmp"),
                      *path.parent.glob(f".{path.name}.*.link")):
            stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_pair(
    stem: Path | str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Write ``STEM.safetensors`` (the tensors, on CPU) and ``STEM.json`` (the metadata) atomically.

    Args:
        stem: path without suffix; its folder is created if needed.
        tensors: name -> tensor; names must be strings, tensors must not share memory.
        metadata: JSON-ready dict; should hold ``format`` (e.g. ``"pclseg-encoder"``). The keys
            ``sha256``, ``format_version`` and ``versions`` are added here.
    """
    weights_path, json_path = pair_paths(stem)
    clash = [key for key in RESERVED_KEYS if key in metadata]
    if clash:
        raise ValueError(f"metadata may not set {', '.join(clash)}: save_pair writes them")
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    data = save_safetensors_bytes(cpu)
    document = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    text = json.dumps(document, indent=2, allow_nan=True) + "\n"  # fails before writing anything
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    staged = [_staged(weights_path, data)]
    try:
        staged.append(_staged(json_path, text.encode("utf-8")))
        _keep_fallback(weights_path)
        os.replace(staged[0], weights_path)
        os.replace(staged[1], json_path)
        _fsync_dir(weights_path.parent)
        _drop_fallback(weights_path)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def load_metadata(stem: Path | str, expect_format: str | None = None) -> dict[str, Any]:
    """Read and check ``STEM.json`` only (format and version), without reading the tensors."""
    _, json_path = pair_paths(stem)
    if not json_path.is_file():
        raise PCLSegError(
            f"{json_path}: missing; a checkpoint needs both its .safetensors and .json files"
        )
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PCLSegError(f"{json_path}: unreadable checkpoint metadata ({error})") from None
    if not isinstance(document, dict) or "sha256" not in document:
        raise PCLSegError(f"{json_path}: not a pclseg checkpoint description (no sha256)")
    found = document.get("format")
    if expect_format is not None and found != expect_format:
        raise PCLSegError(
            f"{json_path}: holds {found!r}, expected {expect_format!r}; pass the right file"
        )
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        writer = document.get("versions", {}).get("pclseg", "an unknown version")
        raise PCLSegError(
            f"{json_path}: format version {version} was written by pclseg {writer}; "
            f"this pclseg ({__version__}) reads up to {FORMAT_VERSION}, so upgrade pclseg"
        )
    return document


def under(tensors: Tensors, prefix: str) -> Tensors:
    """The tensors whose names start with ``prefix``, named without it: one part of a state
    saved with others in one pair (``model.`` beside an optimizer's tensors, ``positional.``)."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_pair(stem: Path | str, expect_format: str | None = None) -> tuple[Tensors, dict[str, Any]]:
    """Read a pair written by :func:`save_pair`; every problem is a one-line :class:`PCLSegError`.

    Args:
        stem: path without suffix.
        expect_format: when given, the JSON's ``format`` must equal it.

    Returns:
        ``(tensors on CPU, metadata)``; nothing is unpickled. When the pair is incomplete
        because a save was killed half-way, the previous pair that save kept is loaded instead
        (see the module docstring); when that is not there either, the error is the pair's.
    """
    try:
        return _load_one(stem, expect_format)
    except PCLSegError:
        fallback = previous_stem(stem)
        if not pair_paths(fallback)[1].is_file():
            raise
        try:
            return _load_one(fallback, expect_format)
        except PCLSegError:
            pass
        raise


def _load_one(stem: Path | str, expect_format: str | None) -> tuple[Tensors, dict[str, Any]]:
    weights_path, _ = pair_paths(stem)
    document = load_metadata(stem, expect_format)
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise PCLSegError(
            f"{weights_path}: missing; a checkpoint needs both its .safetensors and .json files"
        ) from None
    except OSError as error:
        raise PCLSegError(f"{weights_path}: unreadable ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != document["sha256"]:
        raise PCLSegError(
            f"{weights_path}: contents do not match its .json (sha256 differs); the file is "
            "corrupt or the pair comes from two saves: restore both files from one save"
        )
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise PCLSegError(f"{weights_path}: not a valid safetensors file ({error})") from None
    return tensors, document


# --- optimizer state -------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, prefix: str = "optimizer."
) -> tuple[Tensors, dict[str, Any]]:
    """An optimizer's state as tensors and JSON-ready metadata (no pickle).

    Per-parameter tensors (SGD momentum buffers, Adam moments and step counts) become tensors
    named ``{prefix}{param_index}.{name}``; non-tensor per-parameter values and the parameter
    groups (learning rates, betas, ...) go into the metadata.
    """
    state = optimizer.state_dict()
    tensors: Tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}.{name}"] = value.detach().to("cpu", copy=True)
            else:
                scalars.setdefault(str(index), {})[name] = _jsonable(value)
    meta = {"param_groups": _jsonable(state["param_groups"]), "scalars": scalars}
    return tensors, meta


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    prefix: str = "optimizer.",
) -> None:
    """Restore what :func:`optimizer_to_tensors` saved, into an optimizer of the same parameters."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix) :].partition(".")
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {
            key: tuple(value) if isinstance(value, list) and key != "params" else value
            for key, value in group.items()
        }
        for group in meta["param_groups"]
    ]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as error:
        raise PCLSegError(f"saved optimizer state does not fit this model ({error})") from None


# --- random number generators ----------------------------------------------------------------


def rng_state_to_tensors(prefix: str = "rng.") -> tuple[Tensors, dict[str, Any]]:
    """The states of torch (CPU, CUDA, MPS), numpy's global and Python's ``random`` generators.

    Restoring them with :func:`rng_state_from_tensors` makes a resumed run draw the same random
    stream as an uninterrupted one.
    """
    tensors: Tensors = {f"{prefix}torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}cuda.{index}"] = cuda_state.cpu()
    if torch.backends.mps.is_available():
        tensors[f"{prefix}mps"] = torch.mps.get_rng_state().cpu()

    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors[f"{prefix}numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    tensors[f"{prefix}python"] = torch.tensor(py_internal, dtype=torch.int64)
    meta = {
        "numpy": {
            "kind": np_kind,
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "gauss_next": py_gauss},
    }
    return tensors, meta


def rng_state_from_tensors(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str = "rng."
) -> None:
    """Restore the generators saved by :func:`rng_state_to_tensors`.

    CUDA states are restored for the devices present in both the saved run and this machine.
    """
    torch.set_rng_state(tensors[f"{prefix}torch"].to(torch.uint8))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            saved = tensors.get(f"{prefix}cuda.{index}")
            if saved is not None:
                torch.cuda.set_rng_state(saved.to(torch.uint8), index)
    if torch.backends.mps.is_available() and f"{prefix}mps" in tensors:
        torch.mps.set_rng_state(tensors[f"{prefix}mps"].to(torch.uint8))

    np_meta = meta["numpy"]
    np_keys = tensors[f"{prefix}numpy"].numpy().astype(np.uint32)
    np.random.set_state(
        (np_meta["kind"], np_keys, np_meta["pos"], np_meta["has_gauss"], np_meta["cached_gaussian"])
    )
    py_meta = meta["python"]
    py_internal = tuple(int(value) for value in tensors[f"{prefix}python"].tolist())
    random.setstate((py_meta["version"], py_internal, py_meta["gauss_next"]))


@contextmanager
def exclusive(folder: Path | str, what: str = "run") -> Iterator[None]:
    """Hold ``folder/.lock`` for the duration: a second process that would write the same run
    or model folder gets a clear error instead of interleaving its checkpoints with ours.

    The lock is an advisory ``flock`` and goes away with the process, so a killed run never
    leaves a stale lock behind. (Where ``fcntl`` does not exist, Windows, nothing is locked.)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / ".lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise PCLSegError(
                f"{folder}: in use by {owner}; wait for that {what} to finish, stop it, "
                "or choose another output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
