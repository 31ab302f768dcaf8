"""Search checkpoints: parameters, optimiser state, step, multiplier and history in one ``.npz``.

Files are written atomically (a temporary file beside the target, then ``os.replace``), so an
interrupted write leaves the previous checkpoint intact. Pytrees are stored as their flattened leaves
and rebuilt with the structure of a template (the freshly initialised parameters and optimiser state),
which must match the stored structure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = 1


@dataclasses.dataclass
class SearchState:
    """Everything needed to continue a search: the state after ``step`` completed steps."""

    params: Any
    opt_state: Any
    step: int
    multiplier: float
    history: dict[str, list[float]]


def save(path: str | Path, state: SearchState, settings: dict | None = None) -> Path:
    """Writes ``state`` (and the JSON-able search ``settings``) to ``path`` atomically."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, tree in (("params", state.params), ("opt_state", state.opt_state)):
        leaves, treedef = jax.tree.flatten(tree)
        arrays[f"{prefix}/treedef"] = np.asarray(str(treedef))
        for index, leaf in enumerate(leaves):
            arrays[f"{prefix}/{index}"] = np.asarray(leaf)
    for name, values in state.history.items():
        arrays[f"history/{name}"] = np.asarray(values, np.float64)
    meta = dict(format=FORMAT, step=int(state.step), multiplier=float(state.multiplier), settings=settings or {})
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    return atomic_savez(path, arrays)


def load(path: str | Path, params_template: Any, opt_state_template: Any, settings: dict | None = None) -> SearchState:
    """Reads a checkpoint written by :func:`save`, rebuilt on the templates' structures.

    Raises:
      ValueError: if the file is not a checkpoint, or its structure or settings differ from the
        search that tries to resume it (the message names the file and the difference).
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}. Delete it to start afresh.") from error
    with data:
        if "meta" not in data.files:
            raise ValueError(f"{path} is not a search checkpoint (no 'meta' entry).")
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}.")
        stored = meta.get("settings", {})
        if settings is not None and stored != json.loads(json.dumps(settings, sort_keys=True)):
            raise ValueError(
                f"checkpoint {path} was written by a search with settings {stored}, not {settings}. "
                "Resume with the same settings, or delete the checkpoint to start afresh."
            )
        trees = []
        for prefix, template in (("params", params_template), ("opt_state", opt_state_template)):
            leaves, treedef = jax.tree.flatten(template)
            if str(data[f"{prefix}/treedef"]) != str(treedef):
                raise ValueError(
                    f"checkpoint {path}: the stored {prefix} structure {str(data[f'{prefix}/treedef'])} differs "
                    f"from this search's {treedef}."
                )
            restored = []
            for index, leaf in enumerate(leaves):
                value = data[f"{prefix}/{index}"]
                if value.shape != np.shape(leaf):
                    raise ValueError(
                        f"checkpoint {path}: {prefix} leaf {index} has shape {value.shape}, expected {np.shape(leaf)}."
                    )
                restored.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
            trees.append(jax.tree.unflatten(treedef, restored))
        history = {
            name.removeprefix("history/"): data[name].tolist() for name in data.files if name.startswith("history/")
        }
    return SearchState(trees[0], trees[1], int(meta["step"]), float(meta["multiplier"]), history)


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
