"""Weights that stay on disk: models with external data fold in little memory.

A model stored with external data (any model over 2 GB) is loaded without its weights;
each external tensor keeps a reference (made absolute) to its bytes in the input's data
file. Passes read such weights as read-only memory maps, weights a rewrite creates are
appended to a scratch file and referenced the same way, and saving streams every referenced
region into the output's own data file. So peak memory stays near one layer's weights rather
than several copies of the model.
"""
from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphfold.stats import iter_graphs

# Tensors smaller than this stay inside the model proto, as onnx's own writer does.
INLINE_BYTES = 1024
COPY_CHUNK = 64 * 2**20


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node tensors, subgraphs included."""
    for sub in iter_graphs(graph):
        yield from sub.initializer
        for node in sub.node:
            yield from (attr.t for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def has_external_refs(model: onnx.ModelProto) -> bool:
    """True when some tensor's bytes live in a file rather than in the proto."""
    return any(is_external(t) for t in all_tensors(model.graph))


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_info(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def absolutize(model: onnx.ModelProto, base_dir: str) -> None:
    """Point every external reference at its file by absolute path (so it can be read from anywhere).

    Raises ValueError for a reference that leaves ``base_dir`` or names a missing file.
    """
    base = os.path.realpath(base_dir)
    for tensor in all_tensors(model.graph):
        if not is_external(tensor):
            continue
        info = _info(tensor)
        location = info.get("location", "")
        path = os.path.realpath(os.path.join(base, location))
        if os.path.isabs(location) or not path.startswith(base + os.sep):
            raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} leaves the model's folder")
        if not os.path.isfile(path):
            raise ValueError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        offset = int(info.get("offset", 0))
        length = int(info.get("length", os.path.getsize(path) - offset))
        if offset + length > os.path.getsize(path):
            raise ValueError(f"tensor {tensor.name!r}: external data file {location!r} is truncated")
        _set_info(tensor, path, offset, length)


def external_bytes(model: onnx.ModelProto) -> int:
    """How many bytes of the model's tensors live in files."""
    return sum(int(_info(t).get("length", 0)) for t in all_tensors(model.graph) if is_external(t))


def load_all(model: onnx.ModelProto) -> None:
    """Bring every (absolutized) external tensor into the proto, as ``onnx.load`` would."""
    for tensor in all_tensors(model.graph):
        if is_external(tensor):
            info = _info(tensor)
            with open(info["location"], "rb") as source:
                source.seek(int(info.get("offset", 0)))
                tensor.raw_data = source.read(int(info["length"]))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def read(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an external tensor as a read-only memory map of its file."""
    info = _info(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(info["location"], dtype=np.dtype(dtype).newbyteorder("<"), mode="r",
                     offset=int(info.get("offset", 0)), shape=shape)


class Spill:
    """A scratch file for the weights rewrites create, while the model's weights are on disk."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="graphfold-")
        self.path = os.path.join(self._dir, "weights.bin")
        open(self.path, "wb").close()
        # The folded model refers to this file until it is saved; remove it when the process ends.
        atexit.register(self.close)

    def constant(self, name: str, values: np.ndarray) -> gs.Constant:
        """A constant whose bytes are appended to the scratch file and referenced, not held."""
        data = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)
        with open(self.path, "ab") as handle:
            offset = handle.tell()
            handle.write(data.tobytes())
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(values.dtype),
                                  dims=list(values.shape))
        _set_info(tensor, self.path, offset, data.nbytes)
        return gs.Constant(name, LazyValues(tensor))

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def save_streaming(model: onnx.ModelProto, path: str, data_name: str) -> None:
    """Write ``model`` to ``path`` and every tensor's bytes to ``data_name`` beside it.

    External references (to the input's data file or a spill file) are copied region by
    region; in-proto tensors over ``INLINE_BYTES`` move out too. ``model`` is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    data_path = os.path.join(os.path.dirname(path), data_name)
    with open(data_path, "wb") as sink:
        for tensor in all_tensors(out.graph):
            if is_external(tensor):
                info = _info(tensor)
                offset, length = int(info.get("offset", 0)), int(info["length"])
                start = _align(sink)
                with open(info["location"], "rb") as source:
                    source.seek(offset)
                    _copy(source, sink, length)
                _set_info(tensor, data_name, start, length)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BYTES:
                start = _align(sink)
                sink.write(tensor.raw_data)
                length = len(tensor.raw_data)
                tensor.ClearField("raw_data")
                _set_info(tensor, data_name, start, length)
    onnx.save_model(out, path)


def _align(sink, alignment: int = 4096) -> int:
    # Page-aligned regions let readers memory-map each tensor.
    position = sink.tell()
    padding = -position % alignment
    if padding:
        sink.write(b"\0" * padding)
    return position + padding


def _copy(source, sink, length: int) -> None:
    while length > 0:
        chunk = source.read(min(COPY_CHUNK, length))
        if not chunk:
            raise OSError("external data file ended early")
        sink.write(chunk)
        length -= len(chunk)
