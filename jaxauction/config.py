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

Placeholders: exactly ``{query}`` and ``{name}`` are substituted in ``prompt``, ``system``,
``example``, ``example_query`` and ``base_prompt``; every other brace stays literal (``{"headline":
"..."}``, ``{foo}``, a lone ``{``, ``{{``). A brace that opens a placeholder name but is not exactly
the placeholder (``{query``, ``{ name }``, ``{query!r}``, ``{name:>10}``) is reported as a malformed
placeholder, since it is almost always a typo.

Limits: bids and ``base_bid`` are finite numbers in ``[0, MAX_BID]`` (:func:`jaxauction.payments.max_bid`
in float32, about ``3.4e30``); ``temperature`` lies in
``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (``1e-30 .. 1e30``) so that it and its reciprocal are finite in
float32. Advertiser names are non-empty. An advertiser is *mentioned* in a text when one of its
keywords (default: its name) occurs as a whole word (or phrase), case-insensitively: "Alpha" matches
"alpha's deal" but not "Alphabet". ``decoding = "stable"`` needs exactly two advertisers, the linear
rule and no ``base_prompt`` (docs/maths.md §5's sampler).

Every problem is reported as a :class:`ConfigError` naming the file, the line (where it can be found)
and the field, when the file is loaded (before any model is loaded).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from jaxauction import _validation, base
from jaxauction.text import mentions

MAX_BID = _validation.max_bid(np.float32)
"""Largest bid (and ``base_bid``) a configuration accepts: the library's largest bid in float32, so a
configuration that loads runs in either precision."""
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-30, 1e30
"""Accepted ``temperature`` range: the temperature and its reciprocal stay finite in float32."""
PLACEHOLDERS = ("query", "name")
"""The placeholders substituted in prompts, system messages and examples."""
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
        """The chat messages this advertiser's agent is conditioned on (``{query}``/``{name}`` filled in)."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": fill_placeholders(self.system, query=query, name=self.name)})
        if self.example:
            example_query = self.example_query or query
            messages += [
                {"role": "user", "content": fill_placeholders(self.prompt, query=example_query, name=self.name)},
                {"role": "assistant", "content": fill_placeholders(self.example, query=query, name=self.name)},
            ]
        messages.append({"role": "user", "content": fill_placeholders(self.prompt, query=query, name=self.name)})
        return messages

    def mentioned_in(self, text: str) -> bool:
        """Whether ``text`` mentions this advertiser: a keyword (default: the name) as a whole word, any case."""
        return any(mentions(text, word) for word in (self.keywords or (self.name,)))


_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_PLACEHOLDER_START = re.compile(r"\{\s*(" + "|".join(PLACEHOLDERS) + r")\b")


def fill_placeholders(template: str, **values: str) -> str:
    """``template`` with exactly ``{query}`` and ``{name}`` replaced; every other brace is left as it is."""
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def malformed_placeholder(template: str) -> str | None:
    """The first text that opens a placeholder but is not exactly ``{query}``/``{name}`` (None if none)."""
    for match in _PLACEHOLDER_START.finditer(template):
        if not _PLACEHOLDER.match(template, match.start()):
            return template[match.start() : match.end() + 12].split("\n")[0]
    return None


def check_decoding(decoding: str, rule: str, num_agents: int, has_base_prompt: bool) -> str | None:
    """Why ``decoding`` cannot run with this rule, agent count and base prompt (None when it can)."""
    if decoding != "stable":
        return None
    problems = []
    if num_agents != 2:
        problems.append(f"{num_agents} advertisers")
    if base.as_rule(rule).name != "linear":
        problems.append(f"rule {rule!r}")
    if has_base_prompt:
        problems.append("a base_prompt")
    if not problems:
        return None
    return (
        "decoding 'stable' is docs/maths.md §5's sampler for exactly two advertisers, the linear rule and no base_prompt; "
        f"got {', '.join(problems)}. Use decoding 'sample' or 'greedy', or meet those conditions."
    )


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
        return [{"role": "user", "content": fill_placeholders(self.base_prompt, query=self.query, name="")}]

    def generate_options(self) -> dict:
        """The keyword arguments of :func:`jaxauction.generate` this configuration sets (rule excluded)."""
        import jax

        return dict(
            payment=self.payment,
            decoding=self.decoding,
            key=jax.random.key(self.seed),
            max_new_tokens=self.max_new_tokens,
            base_prompt=self.base_messages(),
            base_bid=self.base_bid,
            temperature=self.temperature,
        )


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
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(
            path,
            "<file>",
            f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); save the file as UTF-8.",
            line,
        ) from None
    except OSError as error:
        raise ConfigError(path, "<file>", f"cannot read the file ({error.strerror or error}).") from None
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

    def check_placeholders(field, value, line=None):
        bad = malformed_placeholder(value) if value else None
        if bad is not None:
            fail(
                field,
                f"malformed placeholder {bad!r}; write exactly {{query}} or {{name}} (no spaces, format specs or "
                "missing '}'); every other brace is kept literally.",
                line,
            )

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
    if rule not in base.rule_names():
        fail("rule", f"unknown rule {rule!r}; use one of {list(base.rule_names())}.")
    payment = get(raw, "payment", str, "second_price")
    if payment not in PAYMENT_NAMES:
        fail("payment", f"unknown payment {payment!r}; use one of {list(PAYMENT_NAMES)}.")
    decoding = get(raw, "decoding", str, "sample")
    if decoding not in DECODING_NAMES:
        fail("decoding", f"unknown decoding {decoding!r}; use one of {list(DECODING_NAMES)}.")
    temperature = get(raw, "temperature", float, 1.0)
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        fail(
            "temperature",
            f"must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (it and its reciprocal finite in "
            f"float32), got {temperature}.",
        )
    seed = get(raw, "seed", int, 0)
    max_new_tokens = get(raw, "max_new_tokens", int, 48)
    if max_new_tokens < 1:
        fail("max_new_tokens", f"must be >= 1, got {max_new_tokens}.")
    default_system = get(raw, "system", str, None)
    base_prompt = get(raw, "base_prompt", str, None)
    for field, value in (("system", default_system), ("base_prompt", base_prompt)):
        check_placeholders(field, value)
    base_bid = get(raw, "base_bid", float, 0.0)
    if not 0 <= base_bid <= MAX_BID:
        fail("base_bid", f"must be a finite number >= 0 and at most {MAX_BID:g}, got {base_bid}.")

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
        if not name.strip():
            fail(f"{where}.name", "the advertiser's name is empty; give it a non-empty name.", field_line("name"))
        prompt = get(table, "prompt", str, where=where, line=field_line("prompt"))
        bid = get(table, "bid", float, where=where, line=field_line("bid"))
        if not 0 <= bid <= MAX_BID:
            fail(
                f"{where}.bid",
                f"bid of {name!r} must be a finite number >= 0 and at most {MAX_BID:g}, got {bid}.",
                field_line("bid"),
            )
        keywords = get(table, "keywords", list, [], where=where, line=field_line("keywords"))
        if not all(isinstance(k, str) and k for k in keywords):
            fail(f"{where}.keywords", "expected a list of non-empty strings.", field_line("keywords"))
        texts = {"prompt": prompt}
        for field in ("system", "example", "example_query"):
            texts[field] = get(table, field, str, None, where=where, line=field_line(field))
        for field, value in texts.items():
            if field in table:
                check_placeholders(f"{where}.{field}", value, field_line(field))
        advertisers.append(
            Advertiser(
                name=name,
                prompt=prompt,
                bid=bid,
                system=texts["system"] if texts["system"] is not None else default_system,
                example=texts["example"],
                example_query=texts["example_query"],
                keywords=tuple(keywords),
            )
        )
    names = [a.name for a in advertisers]
    if len(set(names)) != len(names):
        fail("advertisers", f"advertiser names must be distinct, got {names}.")
    problem = check_decoding(decoding, rule, len(advertisers), base_prompt is not None)
    if problem:
        fail("decoding", problem)
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
