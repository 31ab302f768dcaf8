"""The JSONL batch runner behind ``jaxauction batch AUCTIONS.jsonl --out RESULTS.jsonl``.

Input: one auction per line, a JSON object with

* ``prompts`` (required): the advertisers' prompts, each a string, a list of ``{"role", "content"}``
  chat messages, or a list of token ids;
* ``bids`` (required): one non-negative number per prompt;
* ``names`` (optional): one non-empty string per prompt (default ``"agent 0"``, ``"agent 1"``, ...);
* ``base_prompt`` (optional): the platform's prompt, never charged; ``base_bid`` (optional, default 0;
  a nonzero one needs a ``base_prompt``: alone it would have no effect, so it is refused).

Bids and base bids are finite numbers in ``[0, max_bid()]``; names are text UTF-8 can hold (the output is
UTF-8). A UTF-8 byte-order mark is ignored; JSON nested too deeply or a number of thousands of digits is
a bad line like any other.

Blank lines are skipped. Every line is checked before the model loads; the first bad line is
reported with its line number (``AUCTIONS.jsonl:7: bids: ...``). All auctions then run as one
heterogeneous batch (:func:`jaxauction.generate`, chunked by the memory budget), and the output gets
one JSON object per auction, in input order::

    {"line": 1, "names": [...], "bids": [...], "payments": [...], "text": "...", "tokens": [...],
     "token_payments": [[...], ...], "valid": true}

written atomically (an interrupted run leaves no partial file).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from pathlib import Path
from typing import Any

from jaxauction import _validation
from jaxauction import prompts as prompts_lib
from jaxauction.outputs import atomic_path

__all__ = ["BatchLine", "read_auctions", "run_batch", "write_results"]

_KEYS = {"prompts", "bids", "names", "base_prompt", "base_bid"}
_MAX_BID = _validation.max_bid()
"""The largest bid a line may hold: the library's (:func:`jaxauction.payments.max_bid`), checked here so that
a bid ``generate`` would refuse is reported before the model loads."""


@dataclasses.dataclass(frozen=True)
class BatchLine:
    """One validated input line: its 1-based ``line`` number, the auction and the advertiser names."""

    line: int
    prompts: list[Any]
    bids: list[float]
    names: list[str]
    base_prompt: Any = None
    base_bid: float = 0.0


def _number(value) -> bool:
    """A finite real number (not a bool); an int too large for a float (hundreds of digits) is not."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (a number of hundreds of digits stays readable)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _parse_line(text: str, line: int) -> BatchLine:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno}).") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply; an auction is an object of lists and strings.") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object with 'prompts' and 'bids'; got a JSON {type(data).__name__}.")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; the fields are {sorted(_KEYS)}.")
    for required in ("prompts", "bids"):
        if required not in data:
            raise ValueError(f"missing field {required!r}.")
    prompts, bids = data["prompts"], data["bids"]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(
            f"prompts: expected a non-empty list with one prompt per advertiser; got {json.dumps(prompts)[:80]}."
        )
    for i, prompt in enumerate(prompts):
        prompts_lib.check_prompt(prompt, argument=f"prompts[{i}]")
    if (
        not isinstance(bids, list)
        or len(bids) != len(prompts)
        or not all(_number(b) and 0 <= b <= _MAX_BID for b in bids)
    ):
        raise ValueError(
            f"bids: expected a list of {len(prompts)} finite numbers in [0, {_MAX_BID:.3g}] (one per prompt); got "
            f"{_shown(json.dumps(bids), 80)}."
        )
    names = data.get("names", [f"agent {i}" for i in range(len(prompts))])
    if (
        not isinstance(names, list)
        or len(names) != len(prompts)
        or not all(isinstance(n, str) and n.strip() for n in names)
    ):
        raise ValueError(
            f"names: expected a list of {len(prompts)} non-empty strings (one per prompt); got {json.dumps(names)[:80]}."
        )
    for i, name in enumerate(names):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"names[{i}]: {error.reason} at character {error.start} ({name[error.start]!r}: a lone UTF-16 "
                "surrogate, which the output (UTF-8) cannot hold); fix the \\u escape in the input."
            ) from None
    base_prompt = data.get("base_prompt")
    if base_prompt is not None:
        prompts_lib.check_prompt(base_prompt, argument="base_prompt")
    base_bid = data.get("base_bid", 0.0)
    if not (_number(base_bid) and 0 <= base_bid <= _MAX_BID):
        raise ValueError(
            f"base_bid: expected a finite number in [0, {_MAX_BID:.3g}]; got {_shown(json.dumps(base_bid), 40)}."
        )
    _validation.check_base_pair(base_prompt, base_bid)
    return BatchLine(line, prompts, [float(b) for b in bids], names, base_prompt, float(base_bid))


def read_auctions(path: str | Path) -> list[BatchLine]:
    """Reads and validates a JSONL auction file; ``ValueError`` naming ``FILE:LINE`` and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder; expected a JSONL file with one auction per line.") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (Windows editors) is not JSON
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}).") from None
    lines, errors = [], []
    for number, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            lines.append(_parse_line(content, number))
        except ValueError as error:
            errors.append(f"{path}:{number}: {error}")
    if errors:
        more = f" (and {len(errors) - 1} more bad line(s))" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
    if not lines:
        raise ValueError(f"{path}: no auctions; expected one JSON object per line.")
    return lines


def write_results(path: str | Path, lines: list[BatchLine], result) -> None:
    """Writes one JSON object per auction (input order), atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for a, entry in enumerate(lines):
            n, length = len(entry.prompts), int(result.lengths[a])
            valid = bool(result.valid[a])
            record = {
                "line": entry.line,
                "names": entry.names,
                "bids": entry.bids,
                "payments": [float(p) if valid else None for p in result.payments[a, :n]],
                "text": result.texts[a],
                "tokens": [int(t) for t in result.tokens[a, :length]],
                "token_payments": [[float(p) for p in row[:n]] for row in result.token_payments[a, :length]],
                "valid": valid,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_batch(
    source: str | Path,
    out: str | Path,
    options=None,
    *,
    seed: int = 0,
    model=None,
    memory_budget=None,
    progress: bool = True,
) -> list[BatchLine]:
    """Reads ``source``, runs every auction in one batch (auction ``k`` uses key ``split(key(seed))[k]``),
    writes ``out``. ``options``: a :class:`jaxauction.GenerateOptions` (default ``GenerateOptions.create()``),
    checked against the auctions (e.g. ``decoding="stable"`` needs two agents and no base prompt in
    every line) before the model loads. ``model`` is a ``(model, tokenizer)`` pair or a loader callable
    returning one (called only after the input has been validated). Returns the input lines."""
    import jax

    from jaxauction.engine import Auction, GenerateOptions, generate, plan

    options = GenerateOptions.create() if options is None else options
    if not isinstance(options, GenerateOptions):
        raise ValueError(f"options: expected a jaxauction.GenerateOptions; got {type(options).__name__}.")
    seed = _validation.check_seed(seed)
    if memory_budget is None:
        plan.default_memory_budget()  # JAXAUCTION_MEMORY_BUDGET's check, before the model loads
    else:
        memory_budget = plan.parse_memory_budget(memory_budget)
    lines = read_auctions(source)
    try:
        options.check_fits([len(e.prompts) for e in lines], any(e.base_prompt is not None for e in lines))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    options.warn_payment(stacklevel=3)  # once the input is valid, before the model loads
    if callable(model):
        model = model()
    auctions = [Auction(e.prompts, e.bids, base_prompt=e.base_prompt, base_bid=e.base_bid) for e in lines]
    try:
        result = generate(
            auctions,
            options=options,
            key=jax.random.key(seed),
            model=model,
            progress=progress,
            memory_budget=memory_budget,
        )
    except ValueError as error:  # name the input line, not the auction's index in the batch
        message = re.sub(r"auctions\[(\d+)\]", lambda m: f"{source}:{lines[int(m.group(1))].line}", str(error))
        raise ValueError(message) from None
    write_results(out, lines, result)
    return lines
