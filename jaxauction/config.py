"""Auction configuration files (TOML) for the command line and the experiments.

A configuration names the query, the advertisers and the mechanism::

    query = "Vacations in Hawaii"
    rule = "linear"              # or "log_linear"
    payment = "second_price"     # or "kl", "none"
    decoding = "sample"          # or "greedy", "stable"
    temperature = 1.0            # the agents' LLM temperature (see jaxauction.generate)
    seed = 0
    max_new_tokens = 48
    system = "You write short ads."          # optional, default system message for every agent
    base_prompt = "Write a short ad for: {query}"   # optional platform prompt, never charged
    base_bid = 0.0

    [[advertisers]]
    name = "Alpha Airlines"
    bid = 1.0
    prompt = "Write a one-sentence ad for {query} that promotes {name}."
    system = "..."               # optional, overrides the default
    example = "..."              # optional example ad, shown to the model as its previous answer
    example_query = "..."        # optional query of that example turn (default: the query itself)
    keywords = ["Alpha"]         # optional, words that count as a mention (default: the name)

``{query}`` and ``{name}`` are substituted in prompts. Every problem is reported as a
:class:`ConfigError` naming the file, the line (where it can be found) and the field.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

RULE_NAMES = ("linear", "log_linear")
PAYMENT_NAMES = ("second_price", "kl", "none")
DECODING_NAMES = ("sample", "greedy", "stable")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names file, line and field."""

    def __init__(self, path: str | Path, field: str, message: str, line: int | None = None):
        location = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{location}: field '{field}': {message}")
        self.path, self.field, self.line = str(path), field, line


@dataclasses.dataclass(frozen=True)
class Advertiser:
    name: str
    prompt: str
    bid: float
    system: str | None = None
    example: str | None = None
    example_query: str | None = None
    keywords: tuple[str, ...] = ()

    def messages(self, query: str) -> list[dict[str, str]]:
        """The chat messages this advertiser's agent is conditioned on."""
        fill = {"query": query, "name": self.name}
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format(**fill)})
        if self.example:
            example_query = self.example_query or query
            messages += [
                {"role": "user", "content": self.prompt.format(query=example_query, name=self.name)},
                {"role": "assistant", "content": self.example.format(**fill)},
            ]
        messages.append({"role": "user", "content": self.prompt.format(**fill)})
        return messages

    def mentioned_in(self, text: str) -> bool:
        """Whether ``text`` mentions this advertiser (any keyword, case-insensitive)."""
        lowered = text.lower()
        return any(word.lower() in lowered for word in (self.keywords or (self.name,)))


@dataclasses.dataclass(frozen=True)
class AuctionConfig:
    query: str
    advertisers: tuple[Advertiser, ...]
    rule: str = "linear"
    payment: str | None = "second_price"
    decoding: str = "sample"
    temperature: float = 1.0
    seed: int = 0
    max_new_tokens: int = 48
    base_prompt: str | None = None
    base_bid: float = 0.0
    path: str = "<config>"

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.advertisers]

    @property
    def bids(self) -> list[float]:
        return [a.bid for a in self.advertisers]

    def prompts(self) -> list[list[dict[str, str]]]:
        return [a.messages(self.query) for a in self.advertisers]

    def base_messages(self) -> list[dict[str, str]] | None:
        if self.base_prompt is None:
            return None
        return [{"role": "user", "content": self.base_prompt.format(query=self.query, name="")}]


_TABLE_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*advertisers[ \t]*\]\]", re.MULTILINE)


def _line_of(text: str, field: str, table: int | None = None) -> int | None:
    """1-based line of ``field = ...`` in ``text``: top level, or inside the ``table``-th advertiser."""
    key = field.split(".")[-1].split("[")[0]
    headers = [m.start() for m in _TABLE_HEADER.finditer(text)]
    if table is None:
        start, stop = 0, headers[0] if headers else len(text)
    elif table < len(headers):
        start = headers[table]
        stop = headers[table + 1] if table + 1 < len(headers) else len(text)
    else:
        return None
    match = re.compile(rf"^[ \t]*{re.escape(key)}[ \t]*=", re.MULTILINE).search(text, start, stop)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _advertiser_table_line(text: str, index: int) -> int | None:
    headers = list(_TABLE_HEADER.finditer(text))
    return text.count("\n", 0, headers[index].start()) + 1 if index < len(headers) else None


def load_config(path: str | Path) -> AuctionConfig:
    """Reads and validates a TOML auction configuration; raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            path, "<file>", "no such file; pass the path of a TOML configuration (see experiments/configs/hawaii.toml)."
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = getattr(error, "lineno", None)
        if line is None:
            found = re.search(r"line (\d+)", str(error))
            line = int(found.group(1)) if found else None
        raise ConfigError(path, "<syntax>", f"malformed TOML: {error}", line) from None
    return parse_config(raw, path=str(path), text=text)


def parse_config(raw: dict[str, Any], *, path: str = "<config>", text: str = "") -> AuctionConfig:
    """Validates a parsed configuration dictionary; ``text`` (the source) locates lines in errors."""

    def fail(field, message, line=None):
        raise ConfigError(path, field, message, line if line is not None else _line_of(text, field))

    def get(table, field, kind, default=dataclasses.MISSING, *, where=None, line=None):
        name = f"{where}.{field}" if where else field
        if field not in table:
            if default is dataclasses.MISSING:
                fail(name, f"missing; add `{field} = ...`.", line)
            return default
        value = table[field]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            kinds = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            fail(name, f"expected {kinds}, got {type(value).__name__} {value!r}.", line)
        return value

    known = {
        "query",
        "advertisers",
        "rule",
        "payment",
        "decoding",
        "temperature",
        "seed",
        "max_new_tokens",
        "system",
        "base_prompt",
        "base_bid",
    }
    for field in raw:
        if field not in known:
            fail(field, f"unknown field; known fields are {sorted(known)}.")
    query = get(raw, "query", str)
    rule = get(raw, "rule", str, "linear")
    if rule not in RULE_NAMES:
        fail("rule", f"unknown rule {rule!r}; use one of {list(RULE_NAMES)}.")
    payment = get(raw, "payment", str, "second_price")
    if payment not in PAYMENT_NAMES:
        fail("payment", f"unknown payment {payment!r}; use one of {list(PAYMENT_NAMES)}.")
    decoding = get(raw, "decoding", str, "sample")
    if decoding not in DECODING_NAMES:
        fail("decoding", f"unknown decoding {decoding!r}; use one of {list(DECODING_NAMES)}.")
    temperature = get(raw, "temperature", float, 1.0)
    if not 0 < temperature < float("inf"):
        fail("temperature", f"must be a finite number > 0, got {temperature}.")
    seed = get(raw, "seed", int, 0)
    max_new_tokens = get(raw, "max_new_tokens", int, 48)
    if max_new_tokens < 1:
        fail("max_new_tokens", f"must be >= 1, got {max_new_tokens}.")
    default_system = get(raw, "system", str, None)
    base_prompt = get(raw, "base_prompt", str, None)
    base_bid = get(raw, "base_bid", float, 0.0)
    if not base_bid >= 0 or base_bid == float("inf"):
        fail("base_bid", f"must be a finite number >= 0, got {base_bid}.")

    tables = raw.get("advertisers")
    if not isinstance(tables, list) or not tables:
        fail(
            "advertisers",
            "no advertisers; add at least one [[advertisers]] table with name, prompt and bid.",
            _line_of(text, "advertisers") or 0,
        )
    advertisers = []
    adv_known = {"name", "prompt", "bid", "system", "example", "example_query", "keywords"}
    for index, table in enumerate(tables):
        where = f"advertisers[{index}]"
        line = _advertiser_table_line(text, index)
        if not isinstance(table, dict):
            fail(where, "expected a table [[advertisers]].", line)
        for field in table:
            if field not in adv_known:
                fail(
                    f"{where}.{field}",
                    f"unknown field; known fields are {sorted(adv_known)}.",
                    _line_of(text, field, index),
                )

        def field_line(field):
            return _line_of(text, field, index) if field in table else line

        name = get(table, "name", str, where=where, line=field_line("name"))
        prompt = get(table, "prompt", str, where=where, line=field_line("prompt"))
        bid = get(table, "bid", float, where=where, line=field_line("bid"))
        if not (bid >= 0) or bid == float("inf"):
            fail(f"{where}.bid", f"bid of {name!r} must be a finite number >= 0, got {bid}.", field_line("bid"))
        keywords = get(table, "keywords", list, [], where=where, line=field_line("keywords"))
        if not all(isinstance(k, str) and k for k in keywords):
            fail(f"{where}.keywords", "expected a list of non-empty strings.", field_line("keywords"))
        advertisers.append(
            Advertiser(
                name=name,
                prompt=prompt,
                bid=bid,
                system=get(table, "system", str, default_system, where=where, line=field_line("system")),
                example=get(table, "example", str, None, where=where, line=field_line("example")),
                example_query=get(table, "example_query", str, None, where=where, line=field_line("example_query")),
                keywords=tuple(keywords),
            )
        )
    names = [a.name for a in advertisers]
    if len(set(names)) != len(names):
        fail("advertisers", f"advertiser names must be distinct, got {names}.")
    return AuctionConfig(
        query=query,
        advertisers=tuple(advertisers),
        rule=rule,
        payment=None if payment == "none" else payment,
        decoding=decoding,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        base_prompt=base_prompt,
        base_bid=base_bid,
        path=path,
    )
