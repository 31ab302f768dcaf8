"""Search checkpoints: parameters, optimiser state, step, multiplier and history in one ``.npz``.

Files are written atomically through :func:`jaxauction.outputs.atomic_path` (a temporary file beside the
target, then ``os.replace``), so an interrupted write leaves the previous checkpoint intact; temporary
files a killed process left beside the target are removed on the next save. Non-finite parameters are
never written (:func:`save` refuses them). Pytrees are stored as their flattened leaves
and rebuilt with the structure of a template (the freshly initialised parameters and optimiser state),
which must match the stored structure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxauction import outputs

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
    """Writes ``state`` (and the JSON-able search ``settings``) to ``path`` atomically.

    Raises:
      FloatingPointError: if a parameter leaf is not finite (nothing is written).
    """
    for index, leaf in enumerate(jax.tree.leaves(state.params)):
        if not np.all(np.isfinite(np.asarray(leaf, np.float64))):
            raise FloatingPointError(
                f"checkpoint {path}: parameter leaf {index} is not finite at step {state.step}; not written."
            )
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
    with file_errors(path, "search checkpoint", "delete it to start afresh"):
        return _load(path, params_template, opt_state_template, settings)


def _load(path: Path, params_template: Any, opt_state_template: Any, settings: dict | None) -> SearchState:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}. Delete it to start afresh.") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a search checkpoint (not an .npz archive). Delete it to start afresh.")
    with data:
        if "meta" not in data.files:
            raise ValueError(f"{path} is not a search checkpoint (no 'meta' entry).")
        meta = json.loads(str(data["meta"]))
        if not isinstance(meta, dict) or not all(k in meta for k in ("step", "multiplier")):
            raise ValueError(f"{path} is not a search checkpoint (its 'meta' entry lacks step and multiplier).")
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
    for index, leaf in enumerate(jax.tree.leaves(trees[0])):
        if not np.all(np.isfinite(np.asarray(leaf, np.float64))):
            raise ValueError(f"checkpoint {path}: parameter leaf {index} is not finite. Delete it to start afresh.")
    return SearchState(trees[0], trees[1], int(meta["step"]), float(meta["multiplier"]), history)


def check_path(path: str | Path | None, argument: str = "checkpoint") -> Path | None:
    """Before any step runs: ``path`` can be written (:func:`jaxauction.outputs.check_output_path`: not a
    folder, no file on the way, a writable place), else ``ValueError`` naming ``argument``. An existing
    checkpoint is fine (it is resumed); None is no checkpoint."""
    return outputs.check_output_path(argument, path)


def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``path`` atomically (through :func:`jaxauction.outputs.atomic_path`).

    Temporary files that an earlier, killed write left beside ``path`` are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    with outputs.atomic_path(path) as temporary:
        with open(temporary, "wb") as file:  # a file object: np.savez must not append ".npz" to the name
            np.savez(file, **arrays)
    return path


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Removes the temporary files of interrupted atomic writes of ``path``; returns what it removed.

    Those are ``.{name}.*`` beside ``path`` (the names :func:`jaxauction.outputs.atomic_path` and earlier
    versions of this module give them). Only one search should write a given checkpoint at a time.
    """
    path = outputs.destination(path).path  # where atomic_path puts them: beside a symlink's target
    if not path.parent.is_dir():
        return []
    removed = []
    for candidate in path.parent.glob(f".{path.name}.*"):
        if candidate.is_file():
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def file_errors(path: Path, kind: str, fix: str):
    """Turns any error while reading ``path`` into one ``ValueError`` naming the file, ``kind`` and ``fix``.

    The one home for the "corrupt or foreign file" message of the design's ``.npz`` files (search
    checkpoints, cached auction batches). A ``ValueError`` that names the file already passes unchanged.
    """
    try:
        yield
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"cannot read {kind} {path}: {error}. Fix: {fix}.") from error
    except (OSError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"cannot read {kind} {path}: {type(error).__name__}: {error}. It is corrupt or not a {kind}; fix: {fix}."
        ) from error
