"""Reading a checkpoint directory without running code from it.

A recsys checkpoint is a directory: ``trainer.pt`` (Lightning's loop, callback and datamodule
state) and a ``torch.distributed.checkpoint`` (DCP) folder (``.metadata`` plus ``*.distcp``). All
three hold pickles, and unpickling runs whatever callable a pickle names. A checkpoint may come from
anywhere (``--resume-from``, ``--checkpoint``, an MLflow run's artifacts), so every part is read
with an allow-list instead:

- ``trainer.pt``: ``torch.load(weights_only=True)``. Lightning's state is plain data (ints, floats,
  strings, dicts, lists, tensors), so nothing needs adding to torch's allow-list.
- ``.metadata``: DCP reads it with plain ``pickle.load``; here an unpickler that resolves only the
  DCP metadata classes and torch's size/dtype/layout types.
- byte items inside ``*.distcp`` (non-tensor state): DCP loads them with ``weights_only=False``;
  here with ``weights_only=True``. Tensors are raw storage, which DCP already reads safely.

Anything else fails as one RecsysError line naming the file.

A run's plain state dict (``model_state/state_dict.pt``, what recommenders are built from) is read the
same way (``load_state_dict_file``) and kept as safetensors (``save_weights``/``load_weights``): a
format of raw tensors and a JSON header, with no pickle anywhere, so packaged models hold none.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from core.errors import RecsysError

TRAINER_STATE = "trainer.pt"
DCP_METADATA = ".metadata"
MODEL_PREFIX = "model.model."
"""DCP names of the model's weights: the ``model`` entry of a checkpoint holds the LightningModule's
state dict, whose ``model`` is the TorchRec module."""

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # layout name -> torch.layout (a lookup, no side effect)
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


def _refusal(path: Path, what: str) -> RecsysError:
    return RecsysError(f"{path}: refused to load: it names code to run, not only plain data ({what})")


def _pickle_globals(data: bytes) -> list[str] | None:
    """The globals a raw pickle names, read without unpickling; None when ``data`` is no pickle."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) or "a global")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # genops raises ValueError and others on bytes that are no pickle
        return None
    return names


def _weights_only_failure(path: Path, error: Exception) -> RecsysError:
    """The one-line error for a file torch's weights-only unpickler refused: a pickle naming code
    (refused), or bytes that are no checkpoint at all (unreadable)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return _refusal(path, found.group(1))
    names = _pickle_globals(path.read_bytes()) if path.stat().st_size < 1 << 26 else None
    if names:
        return _refusal(path, ", ".join(dict.fromkeys(names)))
    return _unreadable(path, ValueError("not a torch checkpoint"))


def _unreadable(path: Path, error: Exception) -> RecsysError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return RecsysError(f"{path}: not a readable checkpoint file ({first})")


def _torch_load_plain(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure as one line (never torch's advice to
    retry with ``weights_only=False``, which would run what the file names)."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": the file is refused or loaded anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise _weights_only_failure(path, e) from None
        raise _unreadable(path, e) from None
    except Exception as e:  # torch.load raises many types for a file that is not a checkpoint at all
        raise _unreadable(path, e) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict (name -> tensor) written by ``torch.save``, loaded as data only."""
    path = Path(path)
    state = _torch_load_plain(path)
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise RecsysError(f"{path}: not a state dict (expected names -> tensors, got a {type(state).__name__})")
    return dict(state)


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors (deterministic bytes: the same weights give the same file)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (one line when it is not one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise RecsysError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [''])[0]})") from None


def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a safetensors file into ``model``'s parameters one tensor at a time: peak memory is the
    model plus its largest tensor, where reading the whole file first held every weight twice (2.5M
    users' tables: +0.9 GB a loading process). As strict as ``load_state_dict``; one line when the file
    is unreadable or does not fit the model."""
    from safetensors import SafetensorError, safe_open

    expected = set(model.state_dict())
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing, unexpected = sorted(expected - names), sorted(names - expected)
            if missing or unexpected:
                shown = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
                raise RecsysError(f"{path}: does not fit the model ({shown})")
            for name in sorted(names):
                model.load_state_dict({name: f.get_tensor(name)}, strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise RecsysError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [''])[0]})") from None
    except RuntimeError as e:  # a tensor of another shape
        raise RecsysError(f"{path}: does not fit the model ({(str(e).splitlines() or [''])[-1].strip()})") from None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """``trainer.pt`` of a checkpoint directory, loaded as plain data only."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise RecsysError(f"{checkpoint}: not a recsys checkpoint directory (no {TRAINER_STATE} in it)")
    state = _torch_load_plain(path)
    if not isinstance(state, dict):
        raise RecsysError(f"{path}: not a recsys trainer state (a {type(state).__name__}, not a dict)")
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP ``.metadata`` file is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"not allowed: {module}.{name}")


def load_dcp_metadata(stream: Any, path: Path) -> Any:
    """Unpickle a DCP ``.metadata`` stream with the allow-list."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("not allowed: "):
            raise _refusal(path, str(e)[len("not allowed: ") :]) from None
        raise _unreadable(path, e) from None
    except Exception as e:  # truncated or garbage bytes
        raise _unreadable(path, e) from None
    if not isinstance(metadata, Metadata):
        raise RecsysError(f"{path}: not a checkpoint index (a {type(metadata).__name__})")
    return metadata


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with ``.metadata`` unpickled through the allow-list."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                stream = self.fs.create_stream(path, "rb")
            except FileNotFoundError:
                raise RecsysError(f"{path.parent}: not a recsys checkpoint directory (no {DCP_METADATA})") from None
            with stream as f:
                metadata = load_dcp_metadata(f, path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def _planner_class() -> type:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner with non-tensor items loaded as plain data only."""

        checkpoint: Path = Path(".")

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                where = self.checkpoint / read_item.dest_index.fqn
                raise _refusal(where, found.group(1) if found else "not plain data") from None
            # hand the parent a re-serialisation of plain data: its own torch.load then runs nothing
            plain = io.BytesIO()
            torch.save(obj, plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    return SafeLoadPlanner


def safe_load_planner(checkpoint: str | Path, allow_partial_load: bool = False) -> Any:
    """A DCP ``LoadPlanner`` whose byte items are read with ``weights_only=True``."""
    planner = _planner_class()(allow_partial_load=allow_partial_load)
    planner.checkpoint = Path(checkpoint)
    return planner


def dcp_load(state: dict[str, Any], checkpoint: str | Path, optional: tuple[str, ...] = ()) -> list[str]:
    """``torch.distributed.checkpoint.load`` in place, through the safe reader and planner.

    Keys of ``state`` (DCP's dotted names) under an ``optional`` prefix may be absent from the
    checkpoint: they keep the values they have and are returned. Any other absent key is an error.
    Tensors are read whatever shards they were written in: DCP copies every saved chunk's overlap with
    each local shard, so another world size or sharding plan loads the same values.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _reader_class()(str(checkpoint))
    saved = reader.read_metadata().state_dict_metadata
    flat, _ = flatten_state_dict(state)
    absent = [key for key in flat if key not in saved]
    required = [key for key in absent if not key.startswith(optional)]
    if required:
        more = f" and {len(required) - 3} more" if len(required) > 3 else ""
        raise RecsysError(f"{checkpoint}: has no {', '.join(required[:3])}{more}: written for another model")
    planner = safe_load_planner(checkpoint, allow_partial_load=bool(absent))
    try:
        dcp.load(state, checkpoint_id=str(checkpoint), storage_reader=reader, planner=planner)
    except RecsysError:
        raise
    except CheckpointException as e:  # DCP gathers each rank's exception, with its traceback, into one
        errors = [error for error, _ in e.failures.values()]
        ours = [error for error in errors if isinstance(error, RecsysError)]
        if ours:
            raise ours[0] from None
        raise _shard_failure(Path(checkpoint), errors[0] if errors else e) from None
    except Exception as e:  # one process: DCP lets the reader's own exception through
        raise _shard_failure(Path(checkpoint), e) from None
    return absent


def _shard_failure(checkpoint: Path, error: BaseException) -> RecsysError:
    """One line for a ``*.distcp`` shard DCP could not read: tensors are stored as ``torch.save``
    records, which DCP reads with ``weights_only=True``; torch's message then advises retrying
    without it, which would run what the file names, so it is not repeated."""
    shards = checkpoint / "*.distcp"
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            return _refusal(shards, found.group(1))
        return RecsysError(f"{shards}: refused to load: a shard is not plain tensor data")
    first = re.split(r"(?<=\.) ", (str(error).strip().splitlines() or [type(error).__name__])[0])[0]
    return RecsysError(f"{shards}: a checkpoint shard is unreadable ({type(error).__name__}: {first})")


def saved_shapes(checkpoint: str | Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """Full shapes of the tensors a checkpoint holds under ``prefix`` (names without it), read from
    its DCP index alone (through the allow-list)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(checkpoint) / DCP_METADATA
    with path.open("rb") as f:
        metadata = load_dcp_metadata(f, path)
    return {
        key[len(prefix) :]: tuple(value.size)
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)
    }


def check_model_fits(checkpoint: str | Path, model: torch.nn.Module) -> None:
    """Fail fast unless the checkpoint holds exactly ``model``'s weights, shape for shape (``model``
    may be on ``meta``): a resume or evaluation with other ``--arch`` options or another dataset's
    table sizes is one line before any worker starts, not an error deep in the load."""
    saved = saved_shapes(checkpoint, MODEL_PREFIX)
    wanted = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differ = [
        f"{name} is {list(saved[name])} in it, {list(shape)} here"
        for name, shape in wanted.items()
        if name in saved and saved[name] != shape
    ]
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    problems = differ + [f"no {name} in it" for name in missing] + [f"{name} only in it" for name in extra]
    if problems:
        more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise RecsysError(
            f"{checkpoint}: holds another model than this configuration ({'; '.join(problems[:2])}{more}): "
            "use the --arch options and dataset it was trained with"
        )


def check_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Fail fast (before training or evaluation) unless ``checkpoint`` is a directory whose trainer
    state and DCP index load as plain data; returns the trainer state."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise RecsysError(f"{checkpoint}: not a checkpoint directory")
    state = load_trainer_state(directory)
    metadata = directory / DCP_METADATA
    if not metadata.is_file():
        raise RecsysError(f"{checkpoint}: not a recsys checkpoint directory (no {DCP_METADATA} in it)")
    with metadata.open("rb") as f:
        load_dcp_metadata(f, metadata)
    return state
