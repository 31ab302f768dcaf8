"""Bid-ratio sweeps: the same advertisers, the bid moving from one advertiser to the other.

All points (and samples) of one rule run as one batch of auctions in one compiled decode loop. Each
rule is charged the payment it justifies (:func:`rule_config`): the configuration's payment, except
``"second_price"`` under a rule that is not monotone (``log_linear``), which is charged
:func:`jaxauction.mechanism.justified_payment` (``"kl"``) instead: the second-price payment is the
threshold payment of a monotone rule only (docs/maths.md §5, §7).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence

import numpy as np

from jaxauction.base import as_rule
from jaxauction.config import AuctionConfig
from jaxauction.engine import GenerationResult, generate
from jaxauction.mechanism import SpecError, justified_payment, payment_problem


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """A bid-ratio sweep between the first two advertisers of a configuration.

    Attributes:
      names: the advertisers' names.
      shares: ``[P]`` the first advertiser's share of the two swept bids, from 0 to 1.
      bids: ``[P, n]`` the bid profile at every point.
      rules: the rules swept.
      texts: ``texts[rule][p][s]`` the ad of sample ``s`` at point ``p``.
      mentions: ``mentions[rule]: [P, S, n]`` whether each ad mentions each advertiser.
      payments: ``payments[rule]: [P, S, n]`` each advertiser's total payment.
      payment_kinds: ``payment_kinds[rule]`` the payment kind charged under that rule (:func:`rule_config`).
    """

    names: list[str]
    shares: np.ndarray
    bids: np.ndarray
    rules: list[str]
    texts: dict[str, list[list[str]]]
    mentions: dict[str, np.ndarray]
    payments: dict[str, np.ndarray]
    payment_kinds: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "names": self.names,
            "shares": self.shares,
            "bids": self.bids,
            "rules": self.rules,
            "payment_kinds": self.payment_kinds,
            "points": [
                {
                    "rule": rule,
                    "payment": self.payment_kinds.get(rule),
                    "share": float(self.shares[p]),
                    "bids": self.bids[p],
                    "samples": [
                        {
                            "text": self.texts[rule][p][s],
                            "mentions": dict(zip(self.names, self.mentions[rule][p, s].tolist())),
                            "payments": dict(zip(self.names, self.payments[rule][p, s].tolist())),
                        }
                        for s in range(len(self.texts[rule][p]))
                    ],
                }
                for rule in self.rules
                for p in range(len(self.shares))
            ],
        }


def sweep_bids(config: AuctionConfig, points: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shares [P], bids [P, n])``: the first two advertisers' bids ``(w, 1 - w) * total``.

    ``total`` is the sum of their configured bids (1 if both are 0); other advertisers keep theirs.
    """
    if len(config.advertisers) < 2:
        raise ValueError(
            f"{config.path}: a sweep needs at least two advertisers; the configuration has {len(config.advertisers)}."
        )
    if points < 2:
        raise ValueError(f"points: a sweep needs at least 2 points, got {points}.")
    total = config.bids[0] + config.bids[1] or 1.0
    shares = np.linspace(0.0, 1.0, points)
    bids = np.tile(np.asarray(config.bids, dtype=np.float64), (points, 1))
    bids[:, 0] = shares * total
    bids[:, 1] = (1.0 - shares) * total
    return shares, bids


def rule_config(config: AuctionConfig, rule: str) -> AuctionConfig:
    """``config`` with ``rule`` and the payment that rule justifies: the configuration's payment, or, where
    that is ``"second_price"`` and the rule is not monotone, :func:`jaxauction.mechanism.justified_payment`
    (``"kl"`` for ``log_linear``). :class:`~jaxauction.mechanism.SpecError` when the rule does not fit."""
    resolved = as_rule(rule)
    payment = config.payment
    if payment_problem(resolved, payment):
        payment = justified_payment(resolved)
    return config.replace(rule=rule, payment=payment)


def payment_note(result: SweepResult) -> str:
    """One line naming the payment each rule of a sweep was charged, e.g. ``payments: linear: second_price, ...``."""
    kinds = ", ".join(f"{rule}: {result.payment_kinds.get(rule) or 'none'}" for rule in result.rules)
    return f"payments (the one each rule justifies): {kinds}"


def check_rules(config: AuctionConfig, rules: Sequence[str], argument: str = "rules") -> None:
    """Every rule of a sweep makes a valid mechanism with the configuration (e.g. ``decoding = "stable"``
    needs the linear rule); ``ValueError`` naming ``argument`` and the configuration otherwise."""
    if not rules:
        raise ValueError(f"{argument}: expected at least one rule name, e.g. linear.")
    repeated = sorted({rule for rule in rules if list(rules).count(rule) > 1}, key=str)
    if repeated:
        raise ValueError(
            f"{argument}: rule(s) {repeated} given twice; each rule is swept once (its results by its name)."
        )
    for rule in rules:
        try:
            rule_config(config, rule)
        except SpecError as error:
            raise ValueError(f"{argument}: {config.path}: {error.reason}") from None
        except ValueError as error:
            raise ValueError(f"{argument}: {error}") from None


def run_sweep(
    config: AuctionConfig,
    *,
    points: int = 11,
    samples: int = 1,
    rules: Sequence[str] = ("linear", "log_linear"),
    model=None,
    progress: bool = True,
) -> SweepResult:
    """Runs the sweep for every rule: ``points * samples`` auctions per rule, one batch each.

    Every rule is checked against the configuration's decoding before the first one runs (e.g.
    ``decoding = "stable"`` needs the linear rule), so a bad combination costs no compute.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples: expected a positive integer, got {samples!r}.")
    if isinstance(rules, str):
        raise ValueError(f"rules: expected a sequence of rule names such as ['linear'], got the string {rules!r}.")
    check_rules(config, rules)
    shares, bids = sweep_bids(config, points)
    batch_bids = np.repeat(bids, samples, axis=0)
    texts, mentions, paid, kinds = {}, {}, {}, {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rules), desc="sweep", unit="rule")
    try:
        for rule in rules:
            if bar is not None:
                bar.set_postfix_str(rule)
            rule_setup = rule_config(config, rule)
            kinds[rule] = rule_setup.payment
            options = {**rule_setup.generate_options(), "rule": rule}
            result: GenerationResult = generate(config.prompts(), batch_bids, model=model, progress=progress, **options)
            texts[rule] = [result.texts[p * samples : (p + 1) * samples] for p in range(points)]
            mentions[rule] = np.array([[a.mentioned_in(t) for a in config.advertisers] for t in result.texts]).reshape(
                points, samples, -1
            )
            paid[rule] = np.asarray(result.payments).reshape(points, samples, -1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(
        names=config.names,
        shares=shares,
        bids=bids,
        rules=list(rules),
        texts=texts,
        mentions=mentions,
        payments=paid,
        payment_kinds=kinds,
    )


def format_table(result: SweepResult, *, width: int = 140) -> str:
    """A plain-text table: rule, bid share, mentions, payments, and the ad (wrapped)."""
    short = [name.split()[0] for name in result.names]
    header = (
        f"{'rule':<10} {'share ' + short[0]:>12}  {'mentions':<16}"
        + "".join(f"{'pay ' + s:>12}" for s in short)
        + "  ad"
    )
    lines = [header, "-" * len(header)]
    indent = " " * (10 + 1 + 12 + 2 + 16 + 12 * len(short) + 2)
    for rule in result.rules:
        for p, share in enumerate(result.shares):
            for s, text in enumerate(result.texts[rule][p]):
                named = ",".join(n for n, m in zip(short, result.mentions[rule][p, s]) if m) or "-"
                pays = "".join(f"{x:>12.4f}" for x in result.payments[rule][p, s])
                wrapped = textwrap.wrap(text.replace("\n", " "), max(20, width - len(indent))) or [""]
                lines.append(f"{rule:<10} {share:>12.2f}  {named:<16}{pays}  {wrapped[0]}")
                lines += [indent + more for more in wrapped[1:]]
    return "\n".join(lines)


def plot_sweep(result: SweepResult, path) -> None:
    """Saves a PNG: payments (left) and mention share (right) against the first bid share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxauction.outputs import save_figure

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles = {"linear": "-", "log_linear": "--"}
    for rule in result.rules:
        style = styles.get(rule, ":")
        for i, name in enumerate(result.names):
            color = f"C{i}"
            left.plot(
                result.shares,
                result.payments[rule][..., i].mean(axis=1),
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"{name} ({rule}, {result.payment_kinds.get(rule) or 'no'} payment)",
            )
            right.plot(
                result.shares,
                result.mentions[rule][..., i].mean(axis=1),
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"{name} ({rule})",
            )
    share_label = f"bid share of {result.names[0]}"
    left.set(xlabel=share_label, ylabel="total payment (the rule's payment kind in the legend)", title="Payments")
    right.set(xlabel=share_label, ylabel="share of ads that mention it", title="Mentions", ylim=(-0.05, 1.05))
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=8, loc="center right")
    save_figure(figure, path, dpi=120)
    plt.close(figure)
