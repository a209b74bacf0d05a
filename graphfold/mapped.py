"""Models whose large weights stay out of the protobuf message: read in place, written by streaming.

Parsing a model file copies every weight into the message, reading a weight as an array copies
it again, and saving serializes and copies it twice more: on a large model these copies cost
more than the folding. Here the input file is memory-mapped and scanned at the protobuf wire
level; each large initializer of the main graph is left out of the message that is parsed (its
header -- name, type, dims -- stays) and handed to the passes as a read-only array over the
mapping. A ``DetachedModel`` pairs such a message with the arrays of its detached tensors, and
``DetachedModel.write`` streams it to a file: protobuf's own encoding, fields in field-number
order as protobuf writes them, each detached tensor's bytes written straight from its array
(the input's mapping, or a weight a rewrite computed). The file is byte for byte what
``onnx.save_model`` writes for the same model.

The input must stay as it is while it is folded, as under any memory map: a file truncated
meanwhile ends the process (graphfold itself never writes to its input).

Only what the scan fully understands is detached: a top-level initializer with fixed-size
elements, its bytes in ``raw_data``, more than ``DETACH_ELEMENTS`` of them. Anything else
(a file with the graph split over several fields, external data, a wire type protobuf no longer
uses) is left to ``onnx.load``: ``read`` returns None.
"""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import numpy as np
import onnx
from onnx import helper

# Initializers with more elements than this are detached. Shape inference keeps the data of
# tensors up to this size (shapes.KEEP_DATA_ELEMENTS is this): no detached tensor is one a
# Reshape reads its target from.
DETACH_ELEMENTS = 4096

_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_SEGMENT, _TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 3, 9, 13, 14

# Element types whose raw data is one little-endian item per element, as numpy reads it.
DETACHABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
               onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64}


class WireError(ValueError):
    """The bytes are not protobuf the scan understands (the caller falls back to ``onnx.load``)."""


class SizeMismatch(ValueError):
    """A tensor's bytes do not match its dims: the model is invalid."""


# ---------------------------------------------------------------- wire format

def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def fields(buf, start: int, end: int) -> Iterator[tuple[int, bool, int, int, int]]:
    """The fields of the message in ``buf[start:end]``: (number, whether it is length-delimited,
    field start, value start, value end) -- a length-delimited value without its length prefix."""
    pos = start
    while pos < end:
        key, value_start = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, value_end = _varint(buf, value_start, end)
        elif wire_type == _LEN:
            length, value_start = _varint(buf, value_start, end)
            value_end = value_start + length
        elif wire_type == _I64:
            value_end = value_start + 8
        elif wire_type == _I32:
            value_end = value_start + 4
        else:
            raise WireError(f"wire type {wire_type} (groups) is not used by ONNX")
        if number == 0 or value_end > end:
            raise WireError("truncated or invalid field")
        yield number, wire_type == _LEN, pos, value_start, value_end
        pos = value_end


def _split_at(encoded: bytes, number: int) -> int:
    """Where the fields numbered above ``number`` start in a message protobuf serialized
    (it writes fields in number order)."""
    for field_number, _, start, _, _ in fields(encoded, 0, len(encoded)):
        if field_number > number:
            return start
    return len(encoded)


# ---------------------------------------------------------------- the model

@dataclass
class DetachedModel:
    """A model whose tensors named in ``arrays`` are headers only in ``proto`` (name, type,
    dims; no data): their values are the arrays, which may be read-only maps of a file."""

    proto: onnx.ModelProto
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The weights held outside the message."""
        return sum(a.nbytes for a in self.arrays.values())

    def materialize(self) -> onnx.ModelProto:
        """An ordinary self-contained model: each detached tensor's bytes copied into ``proto``
        (which is returned: the DetachedModel is used up)."""
        for tensor in self.proto.graph.initializer:
            values = self.arrays.get(tensor.name)
            if values is not None and not tensor.HasField("raw_data"):
                tensor.raw_data = _little_endian(values).tobytes()
        self.arrays = {}
        return self.proto

    def write(self, handle: BinaryIO) -> int:
        """Stream the model, every detached tensor inside it, to ``handle``; returns the bytes
        written. The caller keeps it under the 2 GB a protobuf message may hold."""
        head, tail, graph = _split_model(self.proto)
        graph_head, entries, graph_tail = _split_graph(graph)
        pieces: list[bytes | np.ndarray] = [graph_head]
        for entry, name in entries:
            values = self.arrays.get(name) if name is not None else None
            if values is None:
                pieces.append(_INIT_TAG + encode_varint(len(entry)) + entry)
                continue
            cut = _split_at(entry, _TENSOR_RAW_DATA)
            data = _little_endian(values)
            prefix = _RAW_TAG + encode_varint(data.nbytes)
            body = len(entry) + len(prefix) + data.nbytes
            pieces += [_INIT_TAG + encode_varint(body) + entry[:cut] + prefix, data, entry[cut:]]
        pieces.append(graph_tail)
        graph_bytes = sum(_size(p) for p in pieces)
        written = 0
        for piece in [head, _GRAPH_TAG + encode_varint(graph_bytes), *pieces, tail]:
            written += _write(handle, piece)
        return written

    def write_external(self, handle: BinaryIO, data: BinaryIO, location: str) -> int:
        """Write the model to ``handle`` with each detached tensor's bytes in ``data`` (the file
        ``location`` names, relative to the model), page-aligned; returns the bytes written."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        written = 0
        for tensor in proto.graph.initializer:
            values = self.arrays.get(tensor.name)
            if values is None or tensor.HasField("raw_data"):
                continue
            values = _little_endian(values)
            offset = data.tell()
            padding = -offset % 4096
            written += data.write(b"\0" * padding)
            offset += padding
            written += _write(data, values)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(values.nbytes))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
        return written + handle.write(proto.SerializeToString())


_GRAPH_TAG, _INIT_TAG, _RAW_TAG = _tag(_MODEL_GRAPH, _LEN), _tag(_GRAPH_INITIALIZER, _LEN), _tag(_TENSOR_RAW_DATA, _LEN)


def _split_model(model: onnx.ModelProto) -> tuple[bytes, bytes, onnx.GraphProto]:
    """The model's encoding without its graph, cut where the graph goes, and the graph."""
    head, tail = _encoded_around(model, _MODEL_GRAPH)
    return head, tail, model.graph


def _split_graph(graph: onnx.GraphProto) -> tuple[bytes, list[tuple[bytes, str | None]], bytes]:
    """The graph's encoding without initializers, cut where they go, and each initializer's
    encoding with its name where it is a header whose data is held outside."""
    head, tail = _encoded_around(graph, _GRAPH_INITIALIZER)
    entries = [(tensor.SerializeToString(), None if tensor.HasField("raw_data") else tensor.name)
               for tensor in graph.initializer]
    return head, entries, tail


def _encoded_around(message, number: int) -> tuple[bytes, bytes]:
    """``message`` encoded without field ``number``, cut where that field goes: the fields
    before it and the fields after it."""
    rest = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.number != number:
            copy_field(rest, descriptor.name, value)
    encoded = rest.SerializeToString()
    cut = _split_at(encoded, number)
    return encoded[:cut], encoded[cut:]


def copy_field(target, name: str, value) -> None:
    """Set field ``name`` of message ``target`` to ``value`` (as ``ListFields`` gives it): a scalar,
    a repeated field or a message."""
    if isinstance(value, (bool, int, float, str, bytes)):
        setattr(target, name, value)
    elif hasattr(value, "extend"):
        getattr(target, name).extend(value)
    else:
        getattr(target, name).CopyFrom(value)


def _little_endian(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False))


def _size(piece) -> int:
    return piece.nbytes if isinstance(piece, np.ndarray) else len(piece)


def _write(handle: BinaryIO, piece) -> int:
    if isinstance(piece, np.ndarray):
        if piece.nbytes:
            handle.write(piece.reshape(-1).view(np.uint8))
        return piece.nbytes
    handle.write(piece)
    return len(piece)


# ---------------------------------------------------------------- reading

def read(path: str) -> DetachedModel | None:
    """The model in ``path`` with its large initializers detached as maps of the file, or None
    when there is nothing to detach or the file is not one the scan understands (``onnx.load``
    then reads it, and reports what is wrong with it). Raises ``SizeMismatch`` for a detachable
    tensor whose bytes do not match its dims, protobuf's ``DecodeError`` for a file it cannot parse."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return None
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        plan = _scan(mapping)
    except WireError:
        plan = None
    if plan is None:
        mapping.close()
        return None
    skeleton, detached = plan
    model = onnx.ModelProto()
    model.ParseFromString(skeleton)
    arrays: dict[str, np.ndarray] = {}
    initializers = model.graph.initializer
    for index, offset, length in detached:
        tensor = initializers[index]
        if tensor.data_type not in DETACHABLE or tensor.name in arrays or \
                math.prod(tensor.dims) <= DETACH_ELEMENTS:
            tensor.raw_data = mapping[offset:offset + length]  # not ours to detach: as it was
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        count = math.prod(tensor.dims)
        if count * dtype.itemsize != length:
            raise SizeMismatch(f"tensor {tensor.name!r} holds {length} bytes, but its dims {list(tensor.dims)} "
                             f"need {count * dtype.itemsize}")
        arrays[tensor.name] = np.frombuffer(mapping, dtype, count, offset).reshape(tuple(tensor.dims))
    if not arrays:
        mapping.close()
        return None
    return DetachedModel(model, arrays)


def _scan(buf) -> tuple[bytes, list[tuple[int, int, int]]] | None:
    """The file's bytes with the raw data of its candidate initializers cut out (length
    prefixes re-encoded), and for each such tensor (initializer index, offset, length)."""
    end = len(buf)
    graphs = [(start, value_start, value_end, delimited)
              for number, delimited, start, value_start, value_end in fields(buf, 0, end) if number == _MODEL_GRAPH]
    if len(graphs) != 1 or not graphs[0][3]:
        return None  # no graph, or one split over several fields (protobuf merges them), or not a message
    graph_start, graph_value, graph_end, _ = graphs[0]
    pieces: list = []  # the graph's fields, in order: byte ranges of the file and re-encoded entries
    detached = []
    index = 0
    for number, delimited, start, value_start, value_end in fields(buf, graph_value, graph_end):
        if number != _GRAPH_INITIALIZER:
            pieces.append((start, value_end))
            continue
        if not delimited:
            raise WireError("an initializer that is not a message")
        raw = _raw_data(buf, value_start, value_end)
        if raw is None:
            pieces.append((start, value_end))
        else:
            field_start, data_start, data_end = raw
            header = bytes(buf[value_start:field_start]) + bytes(buf[data_end:value_end])
            pieces.append(_INIT_TAG + encode_varint(len(header)) + header)
            detached.append((index, data_start, data_end - data_start))
        index += 1
    if not detached:
        return None
    graph = b"".join(bytes(buf[p[0]:p[1]]) if isinstance(p, tuple) else p for p in _merge_ranges(pieces))
    skeleton = b"".join([bytes(buf[:graph_start]), _GRAPH_TAG, encode_varint(len(graph)), graph,
                         bytes(buf[graph_end:end])])
    return skeleton, detached


def _raw_data(buf, start: int, end: int) -> tuple[int, int, int] | None:
    """(field start, data start, data end) of a tensor's raw data worth detaching, else None."""
    raw = None
    for number, delimited, field_start, value_start, value_end in fields(buf, start, end):
        if number in (_TENSOR_SEGMENT, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
            return None
        if number == _TENSOR_RAW_DATA:
            if raw is not None or not delimited:
                return None  # repeated (protobuf keeps the last) or not bytes: onnx's to read
            raw = (field_start, value_start, value_end)
    if raw is None or raw[2] - raw[1] <= DETACH_ELEMENTS:
        return None
    return raw


def _merge_ranges(pieces: list) -> list:
    """Adjacent byte ranges joined, so the skeleton is a few large copies."""
    merged: list = []
    for piece in pieces:
        if isinstance(piece, tuple) and merged and isinstance(merged[-1], tuple) and merged[-1][1] == piece[0]:
            merged[-1] = (merged[-1][0], piece[1])
        else:
            merged.append(piece)
    return merged
