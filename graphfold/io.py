"""Loading and saving models without ever losing the user's data.

Every failure to read a model becomes one ``UsageError`` line. Saving goes through a
temporary file in the destination folder and an atomic rename, so a reader never sees a
half-written model and an existing file is replaced only by a complete one. Models over
the 2 GB protobuf limit are written with their weights in one external data file.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from typing import Callable

import onnx
from google.protobuf.message import DecodeError

from graphfold import mapped
from graphfold.errors import UsageError, first_line
from graphfold.external import (absolutize, all_tensors, external_bytes, has_external_refs, is_external, load_all,
                                save_streaming)

log = logging.getLogger(__name__)

# Protobuf refuses to serialize a message of 2 GiB or more; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when ``model`` is too large for one protobuf message.

    Estimated from tensor dims (weights dominate any model near the limit) instead of
    ``ByteSize()``, which walks the whole message and costs as much as serializing it.
    """
    total = 0
    for tensor in all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data:
            continue  # not loaded: it stays where it is
        itemsize = 8 if tensor.data_type in _WIDE_TYPES else 4
        total += math.prod(tensor.dims) * itemsize
        if total >= EXTERNAL_DATA_THRESHOLD:
            return True
    # Close to the limit, the exact size decides.
    return total >= EXTERNAL_DATA_THRESHOLD // 2 and model.ByteSize() >= EXTERNAL_DATA_THRESHOLD


_WIDE_TYPES = {onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
               onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128, onnx.TensorProto.STRING}


# External weights beyond this stay on disk (see external.py); smaller ones are loaded, so the
# model is an ordinary self-contained proto.
LAZY_EXTERNAL_BYTES = 2**30


def load_model(path: str, *, check: bool = True, lazy: bool | None = None) -> onnx.ModelProto:
    """Read an ONNX model or raise one readable ``UsageError``.

    External data is loaded into the model, unless it exceeds ``LAZY_EXTERNAL_BYTES`` (or
    ``lazy`` is True): then the weights stay on disk, referenced by absolute path, and only
    ``save_model`` writes such a model correctly.
    """
    return load_model_sized(path, check=check, lazy=lazy)[0]


def load_model_sized(path: str, *, check: bool = True, lazy: bool | None = None,
                     detach: bool = False) -> tuple[onnx.ModelProto | mapped.DetachedModel, int]:
    """``load_model``, and the model's bytes on disk (``file_bytes``), read off while loading it:
    afterwards the model no longer says which data files it came from.

    ``detach``: a model file without external data comes back as a ``DetachedModel`` whose
    large weights are read-only maps of the file (see mapped.py), where the file allows."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not an ONNX file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: permission denied")
    size = os.path.getsize(path)
    if size == 0:
        raise UsageError(f"{path}: empty file, not an ONNX model")
    if detach:
        detached = _load_detached(path)
        if detached is not None:
            if check:
                check_model(detached.proto, path, detached=frozenset(detached.arrays))
            return detached, size
    try:
        # Weights in external data files stay there (memory-mapped when read): see external.py.
        model = onnx.load(path, load_external_data=False)
        if has_external_refs(model):
            base_dir = os.path.dirname(os.path.abspath(path))
            size += _data_files_bytes(model, base_dir)
            absolutize(model, base_dir)
            if not (lazy if lazy is not None else external_bytes(model) >= LAZY_EXTERNAL_BYTES):
                load_all(model)
    except DecodeError as exc:
        raise UsageError(f"{path}: not an ONNX model or truncated ({first_line(exc, 'protobuf parse failed')})") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        # Missing or short external data files surface here.
        raise UsageError(f"{path}: cannot read model data: {first_line(exc, '')}") from None
    except Exception as exc:  # protobuf raises assorted types on garbage input
        raise UsageError(f"{path}: not an ONNX model ({type(exc).__name__}: {first_line(exc, '')})") from None
    if not model.HasField("graph"):
        raise UsageError(f"{path}: not an ONNX model (no graph)")
    if check:
        check_model(model, path, on_disk=True)
    return model, size


def _load_detached(path: str) -> mapped.DetachedModel | None:
    """The model with its weights detached, or None to load it the ordinary way (which also
    reports what is wrong with a file the scan could not read)."""
    try:
        detached = mapped.read(path)
    except mapped.SizeMismatch as exc:
        raise UsageError(f"{path}: invalid ONNX graph: {exc}") from None
    except Exception:
        return None
    if detached is None or not detached.proto.HasField("graph") or has_external_refs(detached.proto):
        return None  # external data has its own route
    return detached


def check_model(model: onnx.ModelProto, path: str = "model", on_disk: bool = False,
                detached: frozenset[str] = frozenset()) -> None:
    """Run ``onnx.checker`` and the opset test, turning failures into one ``UsageError`` line.

    The checker sees the model with each weight cut to one element (it checks structure, types
    and schemas, not values, and would otherwise serialize every weight), after the weights'
    byte counts are checked against their dims here. A model whose weights stay on disk is
    checked from ``path`` (``on_disk``), so the checker also sees its data files. ``detached``
    names tensors that are headers only (their bytes were checked as they were mapped).
    """
    _check_opsets(model, path)
    try:
        if on_disk and has_external_refs(model):
            onnx.checker.check_model(path)
        else:
            _check_data_sizes(model, path)
            onnx.checker.check_model(weightless(model, detached))
    except UsageError:
        raise
    except onnx.checker.ValidationError as exc:
        raise UsageError(f"{path}: invalid ONNX graph: {first_line(exc, '')}") from None
    except Exception as exc:  # the checker may raise other errors on broken protos
        raise UsageError(f"{path}: invalid ONNX graph: {type(exc).__name__}: {first_line(exc, '')}") from None


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every field but the main graph's initializers."""
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            mapped.copy_field(copy, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            mapped.copy_field(copy.graph, field.name, value)
    return copy


def weightless(model: onnx.ModelProto, detached: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """``model`` with each fixed-size weight cut to one zero element (same names and types);
    ``detached``: tensors that are headers only, their data held elsewhere."""
    copy = without_initializers(model)
    for init in model.graph.initializer:
        itemsize = _ITEMSIZE.get(init.data_type)
        if itemsize and (init.HasField("raw_data") or init.name in detached):
            copy.graph.initializer.add(name=init.name, data_type=init.data_type, dims=[1], raw_data=b"\0" * itemsize)
        else:
            copy.graph.initializer.append(init)
    return copy


# Element sizes of the types whose raw data is one fixed-size item per element.
_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
             onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
             onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
             onnx.TensorProto.BOOL: 1}


def _check_data_sizes(model: onnx.ModelProto, path: str) -> None:
    for tensor in all_tensors(model.graph):
        itemsize = _ITEMSIZE.get(tensor.data_type)
        if not itemsize or not tensor.HasField("raw_data"):
            continue
        expected = math.prod(tensor.dims) * itemsize
        size = len(tensor.raw_data)
        if size != expected:
            raise UsageError(f"{path}: invalid ONNX graph: tensor {tensor.name!r} holds {size} "
                             f"bytes, but its dims {list(tensor.dims)} need {expected}")


def _check_opsets(model: onnx.ModelProto, path: str) -> None:
    known = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > known:
            raise UsageError(f"{path}: uses ai.onnx opset {opset.version}, newer than the {known} "
                             f"this onnx {onnx.__version__} knows; upgrade onnx")
    if model.ir_version > onnx.IR_VERSION:
        raise UsageError(f"{path}: IR version {model.ir_version} is newer than the {onnx.IR_VERSION} "
                         f"this onnx {onnx.__version__} knows; upgrade onnx")


def ensure_writable(path: str, input_path: str | None = None) -> None:
    """Fail early, before any work, if ``path`` cannot be written or would clobber the input."""
    target = os.path.abspath(path)
    if input_path is not None and os.path.exists(input_path) and os.path.exists(target) \
            and os.path.samefile(target, input_path):
        raise UsageError(f"{path}: output would overwrite the input; graphfold never modifies its input, "
                         "choose another output path")
    if os.path.isdir(target):
        raise UsageError(f"{path}: is a directory; give an output file path")
    folder = os.path.dirname(target) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{path}: {folder} is not a folder")
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: output folder {folder} does not exist")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise UsageError(f"{path}: permission denied")
    # Permission bits do not tell (root passes every os.access test, read-only and virtual file
    # systems refuse anyway): create a file there, which is what saving will do.
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write in {folder}: {exc.strerror or exc}") from None


def save_model(model: onnx.ModelProto | mapped.DetachedModel, path: str,
               verify: Callable[[str], None] | None = None) -> int:
    """Write ``model`` to ``path`` atomically; large models get ``<name>.data`` beside them.
    ``verify`` is called with the staged file's path before anything replaces ``path``; if it
    raises, nothing is written. Returns the bytes written (the model file and its data file)."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    name = os.path.basename(target)
    staging = None
    try:
        try:
            staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
            staged = os.path.join(staging, name)
            data_name = _save(model, staged)
            written = os.path.getsize(staged)
            # onnx writes no data file when every tensor is under its size threshold.
            if data_name is not None and os.path.exists(os.path.join(staging, data_name)):
                written += os.path.getsize(os.path.join(staging, data_name))
            else:
                data_name = None
        except OSError as exc:
            raise UsageError(f"{path}: cannot write output: {exc.strerror or exc}") from None
        if verify is not None:
            verify(staged)  # reads the file as written, data file and all
        try:
            if data_name is not None:
                os.replace(os.path.join(staging, data_name), os.path.join(folder, data_name))
            os.replace(staged, target)
        except OSError as exc:
            raise UsageError(f"{path}: cannot write output: {exc.strerror or exc}") from None
        return written
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _save_detached(model: mapped.DetachedModel, path: str) -> str | None:
    # The header-only message is small: its size plus the detached bytes is the file's.
    if model.proto.ByteSize() + model.nbytes < EXTERNAL_DATA_THRESHOLD:
        with open(path, "wb") as handle:
            model.write(handle)
        return None
    data_name = os.path.basename(path) + ".data"
    with open(path, "wb") as handle, open(os.path.join(os.path.dirname(path), data_name), "wb") as data:
        model.write_external(handle, data, data_name)
    return data_name


def _data_files_bytes(model: onnx.ModelProto, folder: str) -> int:
    """Bytes in the external data files ``model`` names (relative to ``folder``), each counted once."""
    locations = {entry.value for tensor in all_tensors(model.graph) if is_external(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    total = 0
    for location in locations:
        with contextlib.suppress(OSError):
            total += os.path.getsize(os.path.join(folder, location))
    return total


def needs_data_file(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be one self-contained proto: too large, or weights on disk."""
    return has_external_refs(model) or needs_external_data(model)


def session_source(model: onnx.ModelProto, folder: str) -> str | bytes:
    """What an onnxruntime InferenceSession should load for ``model``: its bytes, or, when it
    cannot be one self-contained proto, a copy saved with a data file into ``folder``."""
    if not needs_data_file(model):
        return model.SerializeToString()
    path = os.path.join(folder, "model.onnx")
    _save(model, path)
    return path


def _save(model: onnx.ModelProto | mapped.DetachedModel, path: str) -> str | None:
    """Save, with external data when needed; returns the data file's name, if any."""
    if isinstance(model, mapped.DetachedModel):
        return _save_detached(model, path)
    if not needs_data_file(model):
        onnx.save_model(model, path)
        return None
    data_name = os.path.basename(path) + ".data"
    if has_external_refs(model):
        save_streaming(model, path, data_name)
        return data_name
    # save_model with external data rewrites the tensors it moves; work on a copy so the
    # caller's model keeps its weights in memory.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return data_name
