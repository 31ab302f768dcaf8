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

Limits: ``seed`` is an integer in ``[0, 2**32 - 1]`` (the seeds the PRNG tells apart:
:func:`jaxauction._validation.check_seed`); a nonzero ``base_bid`` needs a ``base_prompt`` (alone it would
be ignored); bids and ``base_bid`` are finite numbers in ``[0, MAX_BID]`` (:func:`jaxauction.payments.max_bid`
in float32, about ``3.4e30``). ``rule``, ``payment``, ``decoding``, ``temperature`` and
``max_new_tokens`` make a :class:`jaxauction.GenerateOptions` and are checked by it (by its
:class:`~jaxauction.mechanism.MechanismSpec`), with the messages ``generate`` gives (``temperature`` in ``[1e-30, 1e30]``: it and its reciprocal finite in float32; ``payment =
"none"`` is no payments). Advertiser names are non-empty. An advertiser is *mentioned* in a text when one of its
keywords (default: its name) occurs as a whole word (or phrase), case-insensitively: "Alpha" matches
"alpha's deal" but not "Alphabet". ``decoding = "stable"`` needs exactly two advertisers, the linear
rule and no ``base_prompt`` (docs/maths.md §5's sampler: :func:`jaxauction.mechanism.stable_problem`).

The known fields and their types are the fields of :class:`AuctionConfig` (those of its options from
:class:`jaxauction.GenerateOptions`) and :class:`Advertiser`: the defaults are the schema.

Every problem is reported as a :class:`ConfigError` naming the file, the line (where it can be found)
and the field, when the file is loaded (before any model is loaded), in time linear in the file's size
(one scan locates every field's line). A valid configuration whose payment its rule does not justify
(``"second_price"`` under ``log_linear``) loads with a :class:`jaxauction.mechanism.PaymentWarning`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from jaxauction import _validation
from jaxauction.engine.request import GenerateOptions
from jaxauction.mechanism import MechanismSpec, SpecError, payment_from_text
from jaxauction.text import mentions

MAX_BID = _validation.max_bid(np.float32)
"""Largest bid (and ``base_bid``) a configuration accepts: the library's largest bid in float32, so a
configuration that loads runs in either precision."""
PLACEHOLDERS = ("query", "name")
"""The placeholders substituted in prompts, system messages and examples."""


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


@dataclasses.dataclass(frozen=True)
class AuctionConfig:
    """A checked configuration; its fields (those of ``options`` spread out) are the TOML file's top-level keys.

    ``options``: the :class:`jaxauction.GenerateOptions` (rule, payment, decoding, temperature,
    max_new_tokens); ``system`` the default system message (already applied to the advertisers
    without one); ``path`` where the configuration came from.
    """

    query: str
    advertisers: tuple[Advertiser, ...]
    options: GenerateOptions = dataclasses.field(default_factory=GenerateOptions)
    seed: int = 0
    system: str | None = None
    base_prompt: str | None = None
    base_bid: float = 0.0
    path: str = "<config>"

    @property
    def mechanism(self) -> MechanismSpec:
        return self.options.mechanism

    @property
    def rule(self) -> str:
        """The rule's registered name."""
        return self.options.rule.name

    @property
    def payment(self) -> str | None:
        return self.options.payment

    @property
    def decoding(self) -> str:
        return self.options.decoding

    @property
    def temperature(self) -> float:
        return self.options.temperature

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens

    def replace(self, **changes) -> AuctionConfig:
        """A copy with fields changed, those of ``options`` (``rule``, ``decoding``, ...) among them, checked
        by :meth:`GenerateOptions.create` (:class:`~jaxauction.mechanism.SpecError`), the decoding against
        the advertisers too."""
        keys = {f.name for f in dataclasses.fields(GenerateOptions)}
        options = {k: changes.pop(k) for k in list(changes) if k in keys}
        if options:
            changes["options"] = GenerateOptions.create(**{**self.options.keywords(), **options})
        config = dataclasses.replace(self, **changes)
        config.options.check_fits(len(config.advertisers), config.base_prompt is not None)
        _validation.check_seed(config.seed)
        _validation.check_base_pair(config.base_prompt, config.base_bid)
        return config

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
        """The keyword arguments of :func:`jaxauction.generate` this configuration sets (the options' by
        name, so that a caller may override one, e.g. the rule)."""
        import jax

        return dict(
            **self.options.keywords(),
            key=jax.random.key(self.seed),
            base_prompt=self.base_messages(),
            base_bid=self.base_bid,
        )


_TABLE_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*advertisers[ \t]*\]\]", re.MULTILINE)
_KEY = re.compile(r"^[ \t]*([A-Za-z0-9_-]+)[ \t]*=", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class _Lines:
    """Where each ``key = ...`` line and each ``[[advertisers]]`` header of a TOML text is: one scan of the
    text, then every lookup is a dictionary access (validating ``N`` advertisers is linear in ``N``).

    ``keys[table]``: ``{key: line}`` of the top level (``table`` None) or of the ``table``-th advertiser
    (its first occurrence); ``headers``: the line of each ``[[advertisers]]`` header.
    """

    keys: dict[int | None, dict[str, int]]
    headers: list[int]

    @classmethod
    def scan(cls, text: str) -> _Lines:
        starts = [m.start() for m in _TABLE_HEADER.finditer(text)]
        newlines = [m.start() for m in re.finditer("\n", text)]
        line_at = lambda offset: bisect.bisect_right(newlines, offset - 1) + 1  # noqa: E731
        keys: dict[int | None, dict[str, int]] = {None: {}}
        for match in _KEY.finditer(text):
            table = bisect.bisect_right(starts, match.start()) - 1
            keys.setdefault(None if table < 0 else table, {}).setdefault(match.group(1), line_at(match.start()))
        return cls(keys, [line_at(start) for start in starts])


def _line_of(lines: _Lines, field: str, table: int | None = None) -> int | None:
    """1-based line of ``field = ...``: top level, or inside the ``table``-th advertiser."""
    return lines.keys.get(table, {}).get(field.split(".")[-1].split("[")[0])


def _advertiser_table_line(lines: _Lines, index: int) -> int | None:
    return lines.headers[index] if index < len(lines.headers) else None


def load_config(path: str | Path) -> AuctionConfig:
    """Reads and validates a TOML auction configuration; raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            path, "<file>", "no such file; pass the path of a TOML configuration (see experiments/configs/hawaii.toml)."
        )
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not TOML
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
    except RecursionError:
        raise ConfigError(
            path, "<syntax>", "nested too deeply; a configuration is flat tables of strings and numbers."
        ) from None
    except tomllib.TOMLDecodeError as error:
        line = getattr(error, "lineno", None)
        if line is None:
            found = re.search(r"line (\d+)", str(error))
            line = int(found.group(1)) if found else None
        raise ConfigError(path, "<syntax>", f"malformed TOML: {error}", line) from None
    return parse_config(raw, path=str(path), text=text)


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateOptions))
_TOP_FIELDS = tuple(f.name for f in dataclasses.fields(AuctionConfig) if f.name not in ("options", "path"))
_KNOWN = {
    "top": sorted(_TOP_FIELDS + _OPTION_FIELDS),
    "advertiser": sorted(f.name for f in dataclasses.fields(Advertiser)),
}


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the raw configuration came from: errors name ``path``, and the line of a field in ``text``."""

    path: str
    text: str
    lines: _Lines = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "lines", _Lines.scan(self.text))

    def fail(self, field: str, message: str, line: int | None = None) -> NoReturn:
        raise ConfigError(self.path, field, message, line if line is not None else _line_of(self.lines, field))

    def line(self, table: dict, field: str, index: int | None) -> int | None:
        """The line of ``field`` (top level, or in the ``index``-th advertiser: its header if absent)."""
        if index is None:
            return _line_of(self.lines, field)
        return _line_of(self.lines, field, index) if field in table else _advertiser_table_line(self.lines, index)


def _toml_types(hint) -> tuple[type, ...]:
    """The TOML value types of a field annotation: ``str | None`` -> ``(str,)``, ``tuple[...]`` -> ``(list,)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) if arg is not type(None) for t in _toml_types(arg))
    return (list,) if typing.get_origin(hint) is tuple else (hint,)


@functools.cache
def _schema(cls) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """The annotations and fields of a configuration dataclass (computed once: not per advertiser)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _read_fields(source: _Source, table: dict, cls, names, index: int | None = None) -> dict[str, Any]:
    """The fields ``names`` of dataclass ``cls`` from a TOML ``table``: its defaults where absent, its
    annotations' types checked (an int is accepted for a float)."""
    hints, defaults = _schema(cls)
    where = "" if index is None else f"advertisers[{index}]."
    values = {}
    for name in names:
        field, line = defaults[name], source.line(table, name, index)
        if name not in table:
            if field.default is dataclasses.MISSING:
                source.fail(where + name, f"missing; add `{name} = ...`.", line)
            values[name] = field.default
            continue
        value, kinds = table[name], _toml_types(hints[name])
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                digits = len(str(abs(value)))
                source.fail(
                    where + name, f"the integer of {digits} digits is too large; give at most {MAX_BID:g}.", line
                )
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            source.fail(
                where + name,
                f"expected {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {value!r}.",
                line,
            )
        values[name] = value
    return values


def _check_known(source: _Source, table: dict, known: list[str], index: int | None = None) -> None:
    where = "" if index is None else f"advertisers[{index}]."
    for field in table:
        if field not in known:
            line = _line_of(source.lines, field, index)
            source.fail(where + field, f"unknown field; known fields are {known}.", line)


def _check_placeholders(source: _Source, field: str, value: str | None, line: int | None = None) -> None:
    bad = malformed_placeholder(value) if value else None
    if bad is not None:
        source.fail(
            field,
            f"malformed placeholder {bad!r}; write exactly {{query}} or {{name}} (no spaces, format specs or "
            "missing '}'); every other brace is kept literally.",
            line,
        )


def _options(source: _Source, raw: dict) -> GenerateOptions:
    """The configuration's :class:`GenerateOptions` (``payment = "none"`` is None), checked by its ``create``."""
    settings = {name: raw[name] for name in _OPTION_FIELDS if name in raw}
    if "payment" in settings:
        settings["payment"] = payment_from_text(settings["payment"])
    try:  # checked here; the payment warning once the whole configuration is valid (parse_config)
        return GenerateOptions(**settings)
    except SpecError as error:
        source.fail(error.argument, error.reason)


def _top_level(source: _Source, raw: dict) -> dict[str, Any]:
    """The top-level fields other than the advertisers and the mechanism, range-checked."""
    values = _read_fields(source, raw, AuctionConfig, [f for f in _TOP_FIELDS if f != "advertisers"])
    for field in ("system", "base_prompt"):
        _check_placeholders(source, field, values[field])
    if not 0 <= values["base_bid"] <= MAX_BID:
        source.fail("base_bid", f"must be a finite number >= 0 and at most {MAX_BID:g}, got {values['base_bid']}.")
    try:
        _validation.check_seed(values["seed"])
        _validation.check_base_pair(values["base_prompt"], values["base_bid"])
    except ValueError as error:
        field, _, message = str(error).partition(": ")
        source.fail(field, message)
    return values


def _advertiser(source: _Source, table: Any, index: int, default_system: str | None) -> Advertiser:
    where = f"advertisers[{index}]"
    if not isinstance(table, dict):
        source.fail(where, "expected a table [[advertisers]].", _advertiser_table_line(source.lines, index))
    _check_known(source, table, _KNOWN["advertiser"], index)
    values = _read_fields(source, table, Advertiser, [f.name for f in dataclasses.fields(Advertiser)], index)
    line = lambda field: source.line(table, field, index)  # noqa: E731
    if not values["name"].strip():
        source.fail(f"{where}.name", "the advertiser's name is empty; give it a non-empty name.", line("name"))
    if not 0 <= values["bid"] <= MAX_BID:
        source.fail(
            f"{where}.bid",
            f"bid of {values['name']!r} must be a finite number >= 0 and at most {MAX_BID:g}, got {values['bid']}.",
            line("bid"),
        )
    if not all(isinstance(k, str) and k for k in values["keywords"]):
        source.fail(f"{where}.keywords", "expected a list of non-empty strings.", line("keywords"))
    for field in ("prompt", "system", "example", "example_query"):
        if field in table:
            _check_placeholders(source, f"{where}.{field}", values[field], line(field))
    if values["system"] is None:
        values["system"] = default_system
    return Advertiser(**{**values, "keywords": tuple(values["keywords"])})


def _advertisers(source: _Source, raw: dict, default_system: str | None) -> tuple[Advertiser, ...]:
    tables = raw.get("advertisers")
    if not isinstance(tables, list) or not tables:
        source.fail(
            "advertisers",
            "no advertisers; add at least one [[advertisers]] table with name, prompt and bid.",
            _line_of(source.lines, "advertisers") or 0,
        )
    advertisers = tuple(_advertiser(source, table, index, default_system) for index, table in enumerate(tables))
    names = [a.name for a in advertisers]
    if len(set(names)) != len(names):
        source.fail("advertisers", f"advertiser names must be distinct, got {names}.")
    return advertisers


def parse_config(raw: dict[str, Any], *, path: str = "<config>", text: str = "") -> AuctionConfig:
    """Validates a parsed configuration dictionary; ``text`` (the source) locates lines in errors."""
    source = _Source(path, text)
    _check_known(source, raw, _KNOWN["top"])
    if "query" not in raw:
        source.fail("query", "missing; add `query = ...`.")
    options = _options(source, raw)
    values = _top_level(source, raw)
    advertisers = _advertisers(source, raw, values["system"])
    try:
        options.check_fits(len(advertisers), values["base_prompt"] is not None)
    except SpecError as error:
        source.fail(error.argument, error.reason)
    options.warn_payment(stacklevel=3)
    return AuctionConfig(**values, advertisers=advertisers, options=options, path=path)
