"""Weights: GGUF and safetensors readers, llama.cpp's q/k permutation, and export to a Hugging Face folder.

Every source is first seen as Hugging Face-named float arrays in torch layout (``[out, in]``), e.g.
``model.layers.3.self_attn.q_proj.weight``, read part by part (a :class:`TensorSource`: safetensors
slices, GGUF rows). ``build_model`` reads each device's part of each fused NNX parameter (``[in, out]``
kernels, ``q|k|v`` per key/value group and ``gate|up`` interleaved, layers stacked ``[L, ...]``) from
the rows it needs, in the model's dtype, straight into its shard (:mod:`jaxauction.models.placement`):
the host holds at most about the largest tensor plus one layer's shard, never the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxauction import sharding
from jaxauction.models import placement
from jaxauction.models.config import LlamaConfig
from jaxauction.models.modeling import Q4_1_BLOCK, Llama, fused_gate_up_columns, fused_qkv_columns

# ---------------------------------------------------------------------------------------- q/k permutation


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` permutation of q/k projection rows (``[out, ...]``).

    Per head, the rows ``[first half | second half]`` (rotate-half RoPE layout of Hugging Face) are
    interleaved into ``[r0, r_{hd/2}, r1, r_{hd/2+1}, ...]`` (llama.cpp's adjacent-pair RoPE layout).
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of ``llama_cpp_permute``: GGUF (interleaved) q/k rows back to the rotate-half layout."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------- GGUF reading

_GGUF_MAGIC = b"GGUF"
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_ARRAY_TYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lies in a GGUF file. ``shape`` is in numpy order (llama.cpp's dims reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    offset: int
    num_bytes: int


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` (key -> value) and ``tensors`` (name -> ``GGUFTensor``).

    The header is parsed directly (``gguf.GGUFReader`` builds one numpy view per vocabulary string and
    takes seconds on a 49k-token vocabulary); tensors are decoded with ``gguf.quants.dequantize``.
    Errors name the file: a missing file raises ``FileNotFoundError``, a malformed or truncated one
    ``ValueError``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise ValueError(f"{self.path} is not a GGUF file: only {size} bytes.")
            self._buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        try:
            self.metadata, self.tensors = self._parse_header()
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError) as error:
            raise ValueError(f"{self.path} is corrupted: its GGUF header cannot be parsed ({error}).") from None

    def _parse_header(self) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
        buffer = self._buffer
        if buffer[:4] != _GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file: magic {bytes(buffer[:4])!r}, expected b'GGUF'.")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buffer, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (expected 2 or 3).")
        if tensor_count > 1 << 20 or kv_count > 1 << 20:
            raise ValueError(f"{self.path} is corrupted: {tensor_count} tensors, {kv_count} metadata keys.")
        position = 24
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, position = self._read_string(position)
            (value_type,) = struct.unpack_from("<I", buffer, position)
            metadata[key], position = self._read_value(value_type, position + 4)
        infos = []
        for _ in range(tensor_count):
            name, position = self._read_string(position)
            (n_dims,) = struct.unpack_from("<I", buffer, position)
            dims = struct.unpack_from(f"<{n_dims}Q", buffer, position + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buffer, position + 4 + 8 * n_dims)
            position += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-position // alignment) * alignment
        tensors = {}
        for name, shape, ggml_type, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ValueError(f"{self.path}: tensor {name!r} has unknown GGML type {ggml_type}.") from None
            num_bytes = int(np.prod(shape, dtype=np.int64)) * type_size // block_size
            start = data_start + offset
            if start + num_bytes > self.size:
                raise ValueError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes {start}..{start + num_bytes} "
                    f"but the file has {self.size} bytes."
                )
            tensors[name] = GGUFTensor(name, shape, qtype, start, num_bytes)
        return metadata, tensors

    def _read_string(self, position: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", self._buffer, position)
        end = position + 8 + length
        if end > self.size:
            raise ValueError(f"{self.path} is truncated inside its metadata (string at byte {position}).")
        return self._buffer[position + 8 : end].decode("utf-8"), end

    def _read_value(self, value_type: int, position: int) -> tuple[Any, int]:
        if value_type == _STRING:
            return self._read_string(position)
        if value_type in _SCALAR_FORMATS:
            fmt = "<" + _SCALAR_FORMATS[value_type]
            return struct.unpack_from(fmt, self._buffer, position)[0], position + struct.calcsize(fmt)
        if value_type == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", self._buffer, position)
            position += 12
            if item_type == _STRING:
                items = []
                for _ in range(count):
                    item, position = self._read_string(position)
                    items.append(item)
                return items, position
            if item_type in _NUMPY_ARRAY_TYPES:
                dtype = np.dtype(_NUMPY_ARRAY_TYPES[item_type]).newbyteorder("<")
                end = position + count * dtype.itemsize
                if end > self.size:
                    raise ValueError(f"{self.path} is truncated inside its metadata (array at byte {position}).")
                return np.frombuffer(self._buffer, dtype, count, position).tolist(), end
            items = []
            for _ in range(count):
                item, position = self._read_value(item_type, position)
                items.append(item)
            return items, position
        raise ValueError(f"{self.path} is corrupted: unknown metadata value type {value_type} at byte {position}.")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes, shaped as ``gguf.quants.dequantize`` expects (read-only view)."""
        info = self.tensors[name]
        data = np.frombuffer(self._buffer, np.uint8, info.num_bytes, info.offset)
        block_size, type_size = gguf.GGML_QUANT_SIZES[info.ggml_type]
        return data.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, numpy shape (e.g. ``[out, in]`` for a projection)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}.")
        values = gguf.quants.dequantize(self.raw(name), self.tensors[name].ggml_type)
        return np.array(values, np.float32).reshape(self.tensors[name].shape)  # a copy: never alias the map

    def close(self) -> None:
        """Unmap the file (deferred to garbage collection while a ``raw`` view is alive)."""
        try:
            self._buffer.close()
        except BufferError:
            pass


_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_tensor_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (and the global tensors)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    inverse = {hf: name for name, hf in _GGUF_TO_HF.items()}
    return f"blk.{layer}.{inverse[module]}.{kind}"


class GGUFWeights:
    """Hugging Face-named tensors of a GGUF file, read part by part (``shape`` and ``read``, like
    :class:`SafetensorsFolder`): a part's rows are dequantized alone (a row of a quantized tensor is
    whole blocks), and for ``general.architecture == "llama"`` the q and k rows are permuted back per
    head (``llama_cpp_unpermute``; ``unpermute=False`` skips that, only to show the logits then break).
    """

    def __init__(self, file: GGUFFile, config: LlamaConfig, *, unpermute: bool = True):
        self.file = file
        self.permuted = unpermute and file.metadata.get("general.architecture") == "llama"
        self.heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

    def _info(self, hf_name: str) -> GGUFTensor:
        name = gguf_tensor_name(hf_name)
        if name not in self.file.tensors:
            raise ValueError(f"{self.file.path}: tensor {name!r} (for {hf_name}) is missing.")
        return self.file.tensors[name]

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self._info(hf_name).shape

    def read(self, hf_name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """``tensor[index]`` as float32 (``index``: concrete slices; None reads it whole)."""
        info = self._info(hf_name)
        index = tuple(slice(0, n) for n in info.shape) if index is None else index
        rows = index[0]
        kind = info.name.split(".")[-2]  # blk.{i}.attn_q.weight -> attn_q
        heads = self.heads.get(kind) if self.permuted and info.name.startswith("blk.") else None
        width = info.shape[0] // heads if heads else 1  # rows of one head: a permuted part is whole heads
        first, last = rows.start // width * width, -(-rows.stop // width) * width
        raw = self.file.raw(info.name)[first:last] if len(info.shape) > 1 else self.file.raw(info.name)
        values = np.array(gguf.quants.dequantize(raw, info.ggml_type), np.float32).reshape(-1, *info.shape[1:])
        if heads:
            values = llama_cpp_unpermute(values, (last - first) // width)
        part = values[(slice(rows.start - first, rows.stop - first), *index[1:])]
        return check_finite(np.ascontiguousarray(part), info.name, self.file.path, index)


def _row_order_restorer(
    file: GGUFFile, config: LlamaConfig, unpermute: bool
) -> Callable[[str, np.ndarray], np.ndarray]:
    """``(gguf_name, rows [out, ...]) -> rows`` with the q and k projections' rows permuted back per head
    (``llama_cpp_unpermute``) for ``general.architecture == "llama"``; other tensors, and everything
    when ``unpermute`` is False, unchanged."""
    permuted = unpermute and file.metadata.get("general.architecture") == "llama"

    def restore(name: str, rows: np.ndarray) -> np.ndarray:
        heads = config.num_heads if ".attn_q." in name else config.num_kv_heads if ".attn_k." in name else None
        return llama_cpp_unpermute(rows, heads) if permuted and heads is not None else rows

    return restore


Q4_1Blocks = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(codes [out, in] uint8 in 0..15, scale [out, in / 32] float16, minimum [out, in / 32] float16)``."""


def q4_1_blocks(raw: np.ndarray) -> Q4_1Blocks:
    """A Q4_1 tensor's stored bytes (``[out, in / 32 * 20]``) split into codes, scales and minima.

    A block of 32 weights is 20 bytes: float16 ``d``, float16 ``m``, then 16 bytes whose low nibbles
    are weights 0..15 and high nibbles weights 16..31; weight ``j`` is ``d * q_j + m``
    (``gguf.quants.dequantize``).
    """
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 20)
    scale = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    minimum = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    nibbles = blocks[..., 4:]
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(rows, -1)
    return codes, scale, minimum


def gguf_q4_1_reader(file: GGUFFile, config: LlamaConfig, *, unpermute: bool = True) -> Callable[[str], Q4_1Blocks]:
    """``hf_name -> Q4_1Blocks`` reader over a GGUF file's Q4_1 projection weights (rows ``[out]``
    permuted back for q and k as in :func:`gguf_weight_reader`); a scale or minimum that is not finite
    raises ``ValueError`` naming the tensor and the file."""
    restore = _row_order_restorer(file, config, unpermute)

    def read(hf_name: str) -> Q4_1Blocks:
        name = gguf_tensor_name(hf_name)
        codes, scale, minimum = q4_1_blocks(file.raw(name))
        for part in (scale, minimum):
            check_finite(part.astype(np.float32), name, file.path)
        return restore(name, codes), restore(name, scale), restore(name, minimum)

    return read


def q4_1_layers_of(file: GGUFFile, config: LlamaConfig) -> bool:
    """Whether every layer projection of the file is Q4_1 with input widths divisible by 32 (then the
    model can hold them quantized)."""
    names = [gguf_tensor_name(n) for n in hf_weight_names(config) if n.endswith("_proj.weight")]
    return all(
        name in file.tensors
        and file.tensors[name].ggml_type == gguf.GGMLQuantizationType.Q4_1
        and file.tensors[name].shape[-1] % Q4_1_BLOCK == 0
        for name in names
    )


# ---------------------------------------------------------------------------------------- safetensors


class SafetensorsFolder:
    """Tensors of ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""

    def __init__(self, folder: Path):
        import safetensors

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index} is not a valid safetensors index ({error}).") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(path.name for path in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"No *.safetensors weights in {folder}.")
            weight_map = None
        self.location: dict[str, str] = {}
        self._handles = {}
        for file in files:
            path = folder / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {index.name}) is missing.")
            try:
                handle = safetensors.safe_open(str(path), framework="numpy")
            except Exception as error:  # safetensors raises its own SafetensorError
                raise ValueError(f"{path} is corrupted: {error}") from None
            self._handles[file] = handle
            for key in handle.keys():
                self.location[key] = file
        if weight_map is not None:
            missing = sorted(key for key, file in weight_map.items() if self.location.get(key) != file)
            if missing:
                raise ValueError(f"{index}: tensors {missing[:3]} are not in the shards the index names.")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(self._slice(hf_name).get_shape())

    def _slice(self, hf_name: str):
        if hf_name not in self.location:
            raise ValueError(f"{self.folder}: tensor {hf_name!r} is missing from the safetensors files.")
        return self._handles[self.location[hf_name]].get_slice(hf_name)

    def read(self, hf_name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """``tensor[index]`` in its stored dtype (``index``: concrete slices; None reads it whole): only
        that part is read from the file."""
        path = self.folder / self.location.get(hf_name, "")
        part = self._slice(hf_name)
        try:
            tensor = part[index if index is not None else tuple(slice(None) for _ in part.get_shape())]
        except Exception as error:
            raise ValueError(f"{path}: cannot read {hf_name!r} ({error}).") from None
        return check_finite(np.asarray(tensor), hf_name, path, index)


def check_finite(
    array: np.ndarray, name: str, file: str | os.PathLike, index: tuple[slice, ...] | None = None
) -> np.ndarray:
    """``array`` unchanged if every entry is finite; otherwise a ``ValueError`` naming the tensor, the file
    and the first bad entry's index in the tensor (``array`` is ``tensor[index]``; None: the whole tensor).

    A checkpoint with NaN or inf weights would load and generate garbage with zero payments, so every
    tensor is checked as it is read (one ``np.isfinite(...).all()`` pass, cheap next to the read itself).
    """
    if not np.isfinite(array).all():
        bad = ~np.isfinite(array)
        local = tuple(int(i) for i in np.argwhere(bad)[0])
        first = tuple(i + (0 if index is None else index[axis].start) for axis, i in enumerate(local))
        part = "" if index is None else " in the part " + ", ".join(f"{s.start}:{s.stop}" for s in index) + " read"
        raise ValueError(
            f"{file}: tensor {name!r} holds {int(bad.sum())} non-finite value(s){part} (first "
            f"{float(array[local])} at index {first}); the checkpoint is corrupted. Re-download or "
            "re-export the model."
        )
    return array


# ---------------------------------------------------------------------------------------- building


def hf_weight_names(config: LlamaConfig) -> Iterator[str]:
    """Every Hugging Face tensor name the model needs."""
    yield "model.embed_tokens.weight"
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        yield from (prefix + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight"))
        if config.qk_norm:
            yield from (f"{prefix}self_attn.{n}_norm.weight" for n in "qk")
        for proj in ("q", "k", "v", "o"):
            yield f"{prefix}self_attn.{proj}_proj.weight"
            if (proj != "o" and config.qkv_bias) or (proj == "o" and config.out_bias):
                yield f"{prefix}self_attn.{proj}_proj.bias"
        yield from (f"{prefix}mlp.{proj}_proj.weight" for proj in ("gate", "up", "down"))
    yield "model.norm.weight"
    if not config.tie_word_embeddings:
        yield "lm_head.weight"


@runtime_checkable
class TensorSource(Protocol):
    """Hugging Face-named tensors (torch layout ``[out, in]``) read part by part:
    :class:`SafetensorsFolder`, :class:`GGUFWeights` or :class:`ArrayWeights`."""

    def shape(self, hf_name: str) -> tuple[int, ...]: ...

    def read(self, hf_name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """``tensor[index]`` (concrete slices, finite-checked; None: the whole tensor)."""
        ...


class ArrayWeights:
    """A :class:`TensorSource` over ``read(hf_name) -> [out, in]`` whole arrays (a dict's ``__getitem__``)."""

    def __init__(self, read: Callable[[str], np.ndarray]):
        self._read = read

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._read(hf_name)))

    def read(self, hf_name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        array = np.asarray(self._read(hf_name))
        return array if index is None else array[index]


def hf_weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the model needs (:func:`hf_weight_names`) and its ``[out, in]`` shape."""
    D, F, hd, V = config.hidden_size, config.intermediate_size, config.head_dim, config.vocab_size
    H, K = config.num_heads * hd, config.num_kv_heads * hd
    weights = {"embed_tokens": (V, D), "lm_head": (V, D), "q_proj": (H, D), "k_proj": (K, D), "v_proj": (K, D)}
    weights |= {"o_proj": (D, H), "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    weights |= {"q_norm": (hd,), "k_norm": (hd,)}

    def shape(name: str) -> tuple[int, ...]:
        module, kind = name.split(".")[-2:]
        return (weights[module][0],) if kind == "bias" else weights.get(module, (D,))  # the rest: [D] norms

    return {name: shape(name) for name in hf_weight_names(config)}


def check_shapes(config: LlamaConfig, weights: TensorSource, source: str) -> None:
    """Every tensor the model needs is there with the shape its config gives (ValueError naming it)."""
    for name, shape in hf_weight_shapes(config).items():
        got = tuple(weights.shape(name))
        if got != shape:
            raise ValueError(f"{source}: tensor {name} has shape {got}, expected {shape} from the config.")


def q4_1_kernel(parts: list[Q4_1Blocks]) -> dict[str, np.ndarray]:
    """The Q4_1 parts of a (fused) ``[in, out]`` kernel from its pieces' ``[out, in]`` blocks, as
    :func:`jaxauction.models.modeling.dequantize_q4_1` reads them."""
    codes, scale, minimum = (np.concatenate([part[k] for part in parts]).T for k in range(3))
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    return {"packed": packed, "scale": scale, "minimum": minimum}


def build_model(
    config: LlamaConfig,
    read: TensorSource | Callable[[str], np.ndarray],
    *,
    dtype=jnp.float32,
    source: str = "weights",
    read_q4_1: Callable[[str], Q4_1Blocks] | None = None,
    mesh: Mesh | None = None,
) -> Llama:
    """A ``Llama`` whose parameters are read from ``read`` (a :class:`TensorSource`, or a function
    ``hf_name -> [out, in]`` array), straight into each device's shard (:mod:`~jaxauction.models.placement`).

    Each shard is read from its part of the Hugging Face tensors (a column range of the fused q|k|v
    kernel from the right rows of q, k and v; one layer of a stacked ``[L, ...]`` weight at a time),
    cast to ``dtype`` and copied to its device: the host never holds the model, only one tensor's
    part at a time. With ``mesh`` (axes ``"auctions"`` and optionally ``"model"``) every weight is
    placed as :meth:`Llama.partition_specs` says (split over ``"model"``, replicated over
    ``"auctions"``), as the engine would place it; without, on the default device. Unsplit (no mesh,
    or a ``"model"`` axis of 1) each weight is stacked whole on the host in ``dtype`` and put once
    (:func:`~jaxauction.models.placement.place_whole`: nothing compiled; the host holds the largest
    stacked weight, not the model).

    With ``read_q4_1`` (``hf_name -> Q4_1Blocks``, see :func:`gguf_q4_1_reader`) the layers' projection
    kernels are read from it and held quantized (``Llama(..., quantization="q4_1")``): each layer's
    fused kernel is built whole on the host (a sixth of its float32 bytes), then split."""
    weights = read if isinstance(read, TensorSource) else ArrayWeights(read)
    check_shapes(config, weights, source)
    quantization = None if read_q4_1 is None else "q4_1"
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), quantization=quantization))
    graphdef, abstract_state = nnx.split(abstract)
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state))
    shardings = _weight_shardings(abstract, mesh)
    split = mesh is not None and sharding.model_devices(mesh) > 1
    if not split:  # the head is read whole twice (it and its [D, V] copy): read and dequantized once
        weights = _SharedRead(weights, "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
    quantized = None if read_q4_1 is None else _q4_1_layer_kernels(config, read_q4_1)
    leaves = {
        path: (leaf, shardings.get(path), _leaf_reader(config, weights, path, leaf.dtype, quantized))
        for path, leaf in shapes.items()
    }
    if split:
        arrays = placement.place(leaves, stacked=lambda path: path[0] == "layers")
    else:  # one device or replicas: each weight stacked on the host and put once, nothing compiled
        arrays = placement.place_whole(leaves, group=lambda path: path[:-1] if path[0] == "layers" else None)
    nnx.replace_by_pure_dict(abstract_state, traverse_util.unflatten_dict(arrays))
    return nnx.merge(graphdef, abstract_state)


class _SharedRead:
    """``weights`` whose tensor ``name`` is read once for two reads of the same part: the first read's
    values are kept until the second takes them (the tied embedding and the ``[D, V]`` head both read
    the whole embedding; a GGUF file dequantizes it once)."""

    def __init__(self, weights: TensorSource, name: str):
        self.weights, self.name, self.kept = weights, name, {}

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self.weights.shape(hf_name)

    def read(self, hf_name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        if hf_name != self.name:
            return self.weights.read(hf_name, index)
        key = None if index is None else tuple((part.start, part.stop) for part in index)
        if key in self.kept:
            return self.kept.pop(key)
        self.kept[key] = values = self.weights.read(hf_name, index)
        return values


def _weight_shardings(abstract: Llama, mesh: Mesh | None) -> dict[tuple[str, ...], NamedSharding]:
    """``path -> NamedSharding`` of each weight on ``mesh`` (the model's partition specs; empty without)."""
    if mesh is None:
        return {}
    mesh = sharding.check_mesh(mesh)
    size = sharding.model_devices(mesh)
    if size > 1:
        specs = traverse_util.flatten_dict(
            nnx.to_pure_dict(abstract.partition_specs(sharding.AXIS, sharding.MODEL_AXIS, size)[0])
        )
    else:
        specs = dict.fromkeys(traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(abstract)[1])), PartitionSpec())
    return {path: NamedSharding(mesh, spec) for path, spec in specs.items()}


def _kernel_parts(config: LlamaConfig) -> dict[str, tuple[list[str], list[int], np.ndarray]]:
    """Each layer kernel (``"attention/qkv_proj"``...) as ``(modules, rows, order)``: the Hugging Face
    modules whose ``[rows_j, in]`` weights (and ``[rows_j]`` biases) are concatenated, and the kernel's
    columns as indices into that concatenation (:func:`fused_qkv_columns`, :func:`fused_gate_up_columns`)."""
    D, F, hd = config.hidden_size, config.intermediate_size, config.head_dim
    H, K = config.num_heads * hd, config.num_kv_heads * hd
    return {
        "attention/qkv_proj": ([f"self_attn.{p}_proj" for p in "qkv"], [H, K, K], fused_qkv_columns(config)),
        "attention/o_proj": (["self_attn.o_proj"], [D], np.arange(D)),
        "mlp/gate_up_proj": (["mlp.gate_proj", "mlp.up_proj"], [F, F], fused_gate_up_columns(F)),
        "mlp/down_proj": (["mlp.down_proj"], [D], np.arange(D)),
    }


def fused_part(
    weights: TensorSource, names: list[str], sizes: list[int], order: np.ndarray, index, dtype
) -> np.ndarray:
    """Part ``index`` of a kernel ``[in, out]`` (``index = (in, out)`` slices) or bias ``[out]``
    (``index = (out,)``) whose column ``j`` is row ``order[j]`` of the concatenated ``[size_k, in]``
    tensors ``names``, as ``dtype``: from each tensor only the rows that part needs are read (one
    contiguous range; in the fused layouts a device's columns are whole key/value groups, gate/up pairs)."""
    wanted = order[index[-1]]
    rest = index[:-1]
    out = np.empty((*(part.stop - part.start for part in rest), wanted.size), dtype)
    start = 0
    for name, size in zip(names, sizes):
        hit = np.flatnonzero((wanted >= start) & (wanted < start + size))
        if hit.size:
            local = wanted[hit] - start
            low, high = int(local.min()), int(local.max()) + 1
            slab = weights.read(name, (slice(low, high), *rest))
            rows = slab if np.array_equal(local, np.arange(low, high)) else slab[local - low]
            out[..., hit] = np.moveaxis(rows, 0, -1)
            del slab, rows
        start += size
    return out


def _transposed(weights: TensorSource, name: str, index, dtype) -> np.ndarray:
    """Part ``index = (rows, columns)`` of the ``[in, out]`` transpose of the ``[out, in]`` tensor ``name``."""
    part = weights.read(name, (index[1], index[0]))
    out = np.empty(part.shape[::-1], dtype)
    out[...] = part.T
    return out


_LAYER_TENSORS = {
    ("input_norm", "weight"): "input_layernorm.weight",
    ("post_attention_norm", "weight"): "post_attention_layernorm.weight",
    ("attention", "q_norm", "weight"): "self_attn.q_norm.weight",
    ("attention", "k_norm", "weight"): "self_attn.k_norm.weight",
}


def _leaf_reader(config: LlamaConfig, weights: TensorSource, path: tuple[str, ...], dtype, quantized) -> placement.Read:
    """``index -> part`` of the model weight at ``path`` (of ``nnx.to_pure_dict(state)``) as ``dtype``;
    for a stacked layer weight the index's first slice is one layer ``(i, i + 1)`` and the part ``[1, ...]``."""
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    whole = {
        ("embedding",): "model.embed_tokens.weight",
        ("lm_head",): "lm_head.weight",
        ("final_norm", "weight"): "model.norm.weight",
    }
    if path in whole:
        return lambda index: np.asarray(weights.read(whole[path], index), dtype)
    if path == ("head_transposed",):
        return lambda index: _transposed(weights, head, index, dtype)
    if path[0] != "layers":
        raise ValueError(f"build_model: no Hugging Face tensor for the weight {'/'.join(path)}.")
    path = path[1:]

    def prefix(index) -> str:
        return f"model.layers.{index[0].start}."

    if path in _LAYER_TENSORS:
        return lambda index: np.asarray(weights.read(prefix(index) + _LAYER_TENSORS[path], index[1:]), dtype)[None]
    names, sizes, order = _kernel_parts(config)["/".join(path[:2])]
    if path[-1] in ("kernel", "bias"):
        suffix = ".weight" if path[-1] == "kernel" else ".bias"

        def read(index):
            tensors = [prefix(index) + name + suffix for name in names]
            return fused_part(weights, tensors, sizes, order, index[1:], dtype)[None]

        return read
    return lambda index: quantized(prefix(index), "/".join(path[:2]))[path[-1]][index[1:]][None]


def _q4_1_layer_kernels(config: LlamaConfig, read_q4_1: Callable[[str], Q4_1Blocks]) -> Callable:
    """``(layer prefix, kernel) -> {"packed", "scale", "minimum"}`` of one layer's Q4_1 kernel, fused
    and in its column order; the last one is kept (its three parts and every shard read it)."""
    parts = _kernel_parts(config)

    @functools.lru_cache(maxsize=1)
    def kernel(prefix: str, name: str) -> dict[str, np.ndarray]:
        names, _, order = parts[name]
        fused = q4_1_kernel([read_q4_1(prefix + module + ".weight") for module in names])
        return {key: np.ascontiguousarray(value[:, order]) for key, value in fused.items()}

    return kernel


def hf_state_dict(model: Llama) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, float array [out, in])`` pairs of the model, the fused kernels split again."""
    config = model.config
    H, K, hd, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    qkv_order, gate_up_order = np.argsort(fused_qkv_columns(config)), np.argsort(fused_gate_up_columns(F))
    yield "model.embed_tokens.weight", np.asarray(model.embedding[...])
    layer_graphdef, stacked = nnx.split(model.layers)  # weights [L, ...]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layer = nnx.merge(layer_graphdef, jax.tree.map(lambda weights, i=i: weights[i], stacked))
        yield p + "input_layernorm.weight", np.asarray(layer.input_norm.weight[...])
        yield p + "post_attention_layernorm.weight", np.asarray(layer.post_attention_norm.weight[...])
        if config.qk_norm:
            yield p + "self_attn.q_norm.weight", np.asarray(layer.attention.q_norm.weight[...])
            yield p + "self_attn.k_norm.weight", np.asarray(layer.attention.k_norm.weight[...])
        qkv = np.asarray(layer.attention.qkv_proj.weight()).T[qkv_order]  # rows back in [q | k | v] order
        splits = {"q": qkv[: H * hd], "k": qkv[H * hd : (H + K) * hd], "v": qkv[(H + K) * hd :]}
        for proj, weight in splits.items():
            yield f"{p}self_attn.{proj}_proj.weight", np.ascontiguousarray(weight)
        if config.qkv_bias:
            bias = np.asarray(layer.attention.qkv_proj.bias[...])[qkv_order]
            yield p + "self_attn.q_proj.bias", bias[: H * hd]
            yield p + "self_attn.k_proj.bias", bias[H * hd : (H + K) * hd]
            yield p + "self_attn.v_proj.bias", bias[(H + K) * hd :]
        yield p + "self_attn.o_proj.weight", np.ascontiguousarray(np.asarray(layer.attention.o_proj.weight()).T)
        if config.out_bias:
            yield p + "self_attn.o_proj.bias", np.asarray(layer.attention.o_proj.bias[...])
        gate_up = np.asarray(layer.mlp.gate_up_proj.weight()).T[gate_up_order]
        yield p + "mlp.gate_proj.weight", np.ascontiguousarray(gate_up[:F])
        yield p + "mlp.up_proj.weight", np.ascontiguousarray(gate_up[F:])
        yield p + "mlp.down_proj.weight", np.ascontiguousarray(np.asarray(layer.mlp.down_proj.weight()).T)
    yield "model.norm.weight", np.asarray(model.final_norm.weight[...])
    if model.lm_head is not None:
        yield "lm_head.weight", np.asarray(model.lm_head[...])


def save_safetensors(model: Llama, folder: Path, *, max_shard_bytes: int | None = None) -> list[Path]:
    """Write the weights as ``model.safetensors``, or as shards with ``model.safetensors.index.json``."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, array in hf_state_dict(model):
        if max_shard_bytes is not None and sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = np.ascontiguousarray(array)
        sizes[-1] += array.nbytes
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        paths.append(folder / name)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def read_json(path: Path) -> Mapping[str, Any]:
    """``json.load`` with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}} at the top level, got a JSON {type(data).__name__}.")
    return data
