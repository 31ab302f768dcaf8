"""Comparing mechanisms on the same ads (docs/maths.md §9): the single-winner baseline and the per-ad metrics.

- :func:`single_winner`: today's ad auction; the highest bidder's own prompt writes the ad alone and
  it is charged the second-highest bid for every token of its ad (ties go to the lower index).
- :func:`ad_metrics`: from teacher-forced log-probabilities of each final ad ``y = y_1..y_T``:
  advertiser ``i``'s value ``v_i = sum_t [log p_i(y_t | y_<t) - log p_0(y_t | y_<t)]``, the welfare
  ``sum_i b_i v_i``, the revenue ``sum_i z_i``, whether each advertiser's name is mentioned (whole
  words, case-insensitive) and the user's side, the mean per-token ``log p_0(y_t | y_<t)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxauction import _validation, engine, mechanism
from jaxauction import prompts as prompts_lib
from jaxauction import text as text_lib
from jaxauction.engine.request import validate_model
from jaxauction.engine.scoring import token_log_probs

__all__ = ["AdMetrics", "SingleWinnerResult", "ad_metrics", "mentions", "single_winner", "single_winner_payments"]


@dataclasses.dataclass(frozen=True)
class SingleWinnerResult:
    """What :func:`single_winner` returns (the ``A`` axis dropped for ``bids: [n]``).

    Attributes:
      texts: ``A`` ads; ``tokens: [A, T]`` (pad id after the length), ``lengths: [A]`` (EOS included).
      winners: ``[A]`` index of the winning advertiser.
      payments: ``[A, n]``: the winner pays ``second-highest bid * length``, the others 0.
      bids: ``[A, n]``.
    """

    texts: list[str]
    tokens: np.ndarray
    lengths: np.ndarray
    winners: np.ndarray
    payments: np.ndarray
    bids: np.ndarray

    @property
    def text(self) -> str:
        return self.texts[0]


def single_winner_payments(bids, lengths) -> tuple[np.ndarray, np.ndarray]:
    """The single-winner payment rule (docs/maths.md §9) for ``bids [A, n]`` and ad ``lengths [A]``.

    Returns ``(winners [A], payments [A, n])``: the winner is the highest bidder (ties to the lower
    index) and pays the second-highest bid per token of its ad (0 with ``n = 1``); the others pay 0.
    """
    bids = np.atleast_2d(np.asarray(bids, np.float64))
    num, n = bids.shape
    winners = np.argmax(bids, axis=1)  # the first maximum: ties to the lower index
    second = np.sort(bids, axis=1)[:, -2] if n > 1 else np.zeros(num)
    payments = np.zeros((num, n))
    payments[np.arange(num), winners] = second * np.asarray(lengths)
    return winners, payments


def single_winner(
    prompts, bids, *, key=None, max_new_tokens: int = 48, model=None, decoding: str = "sample"
) -> SingleWinnerResult:
    """The single-winner baseline of docs/maths.md §9 for ``A`` bid profiles.

    Args:
      prompts: the ``n`` advertisers' prompts (as for :func:`jaxauction.generate`).
      bids: ``[n]`` or ``[A, n]`` non-negative bids.
      key: PRNG key (default ``jax.random.key(0)``); profile ``a`` uses the ``a``-th split of it.
      max_new_tokens: length limit of the ad.
      model: ``(model, tokenizer)``; ``None`` loads the bundled model.
      decoding: ``"sample"`` (draw from the winner's LLM) or ``"greedy"``.

    Returns:
      A :class:`SingleWinnerResult`. With ``n = 1`` the second-highest bid is 0 (the ad is free).
      One generation per distinct winner, batched over the profiles it wins.
    """
    import jax

    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts: expected a non-empty list with one prompt per advertiser; got {prompts!r:.80}.")
    if mechanism.check_decoding(decoding) == "stable":
        raise ValueError(
            "decoding: the single-winner baseline writes with one LLM, and 'stable' is the two-agent auction "
            "sampler; use 'sample' or 'greedy'."
        )
    n = len(prompts)
    bid_array = _validation.host_bids("bids", bids, num_agents=n)
    single = bid_array.ndim == 1
    bid_array = np.atleast_2d(bid_array)
    num = len(bid_array)
    winners = np.argmax(bid_array, axis=1)  # the first maximum: ties to the lower index
    keys = jax.random.split(jax.random.key(0) if key is None else key, num)
    model = validate_model(model)
    tokenizer = model[1]
    tokens = np.full((num, max_new_tokens), prompts_lib.pad_id(tokenizer), np.int32)
    lengths = np.zeros(num, np.int64)
    texts = [""] * num
    for winner in np.unique(winners):
        rows = np.flatnonzero(winners == winner)
        out = engine.generate(
            [prompts[int(winner)]], np.ones((len(rows), 1)), rule="linear", payment=None, decoding=decoding,
            key=keys[rows], max_new_tokens=max_new_tokens, model=model,
        )  # fmt: skip
        tokens[rows] = np.atleast_2d(out.tokens)
        lengths[rows] = np.atleast_1d(out.lengths)
        for row, text in zip(rows, out.texts):
            texts[row] = text
    _, payments = single_winner_payments(bid_array, lengths)
    result = SingleWinnerResult(
        texts=texts, tokens=tokens, lengths=lengths, winners=winners, payments=payments, bids=bid_array
    )
    if single:
        result = dataclasses.replace(
            result,
            tokens=tokens[0],
            lengths=lengths[0],
            winners=winners[0],
            payments=payments[0],
            bids=bid_array[0],
        )
    return result


def mentions(texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """``[A, n]`` bool: ``names[i]`` occurs in ``texts[a]`` as whole words, case-insensitively.

    "Alpha Airlines" matches "ALPHA AIRLINES flies" but not "AlphaAirlines" or "Alpha Air"; any run of
    whitespace between the name's words matches.
    """
    return np.array([[text_lib.mentions(t, name) for name in names] for t in texts], bool).reshape(
        len(texts), len(names)
    )


@dataclasses.dataclass(frozen=True)
class AdMetrics:
    """Per-ad metrics of docs/maths.md §9 for ``A`` ads among ``n`` advertisers (numpy, float64).

    Attributes:
      values: ``[A, n]`` ``v_i = sum_t [log p_i(y_t | y_<t) - log p_0(y_t | y_<t)]``.
      welfare: ``[A]`` ``sum_i b_i v_i``.
      revenue: ``[A]`` ``sum_i z_i``.
      mentioned: ``[A, n]`` bool, each advertiser's name in the ad.
      user_log_prob: ``[A]`` mean per-token ``log p_0(y_t | y_<t)`` (closeness to the organic answer).
      lengths: ``[A]`` tokens of each ad; ``texts``: the decoded ads; ``bids``, ``payments``: ``[A, n]``.
      names: the ``n`` advertiser names.
    """

    values: np.ndarray
    welfare: np.ndarray
    revenue: np.ndarray
    mentioned: np.ndarray
    user_log_prob: np.ndarray
    lengths: np.ndarray
    texts: list[str]
    bids: np.ndarray
    payments: np.ndarray
    names: list[str]

    def records(self) -> list[dict]:
        """One JSON-ready dict per ad."""
        return [
            dict(
                text=self.texts[a],
                length=int(self.lengths[a]),
                bids=self.bids[a].tolist(),
                payments=self.payments[a].tolist(),
                values=self.values[a].tolist(),
                welfare=float(self.welfare[a]),
                revenue=float(self.revenue[a]),
                mentioned=[bool(x) for x in self.mentioned[a]],
                user_log_prob=float(self.user_log_prob[a]),
            )
            for a in range(len(self.texts))
        ]


def ad_metrics(model, prompts, base_prompt, bids, ad_tokens, payments, names) -> AdMetrics:
    """The per-ad metrics of docs/maths.md §9 (see :class:`AdMetrics`), scored in one teacher-forced batch.

    Args:
      model: ``(model, tokenizer)``; ``None`` loads the bundled model.
      prompts: the ``n`` advertisers' prompts (their LLMs ``p_i``).
      base_prompt: the no-ad prompt (``p_0``).
      bids: ``[A, n]`` (or ``[n]`` for one ad) the bids the ads were auctioned with.
      ad_tokens: ``A`` token-id sequences (each the ad's tokens, EOS included if generated; no padding).
      payments: ``[A, n]`` (or ``[n]``) what each advertiser paid for the ad.
      names: the ``n`` advertiser names, for the mention test.

    Returns:
      An :class:`AdMetrics`. The ``(n + 1) A`` rows (every ad under every prompt) are scored by
      :func:`jaxauction.engine.scoring.token_log_probs`.
    """
    model = validate_model(model)
    tokenizer = model[1]
    n = len(prompts)
    bid_array = np.atleast_2d(_validation.host_bids("bids", bids, num_agents=n))
    pay = np.atleast_2d(np.asarray(payments, np.float64))
    rows = [[int(t) for t in r] for r in ad_tokens]
    num = len(rows)
    if bid_array.shape != (num, n) or pay.shape != (num, n):
        raise ValueError(
            f"bids, payments: expected shape [A, n] = ({num}, {n}) (one row per ad in ad_tokens, one column "
            f"per prompt); got bids {bid_array.shape} and payments {pay.shape}."
        )
    if len(names) != n:
        raise ValueError(f"names: expected {n} advertiser names (one per prompt); got {len(names)}.")
    if num == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("ad_tokens: expected at least one ad, each with at least one token.")
    scores = token_log_probs(model, [*prompts, base_prompt], rows).astype(np.float64)
    seq = scores.sum(axis=-1)  # [n + 1, A]
    values = (seq[:n] - seq[n][None]).T
    lengths = np.array([len(r) for r in rows])
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    return AdMetrics(
        values=values,
        welfare=(bid_array * values).sum(axis=1),
        revenue=pay.sum(axis=1),
        mentioned=mentions(texts, names),
        user_log_prob=seq[n] / lengths,
        lengths=lengths,
        texts=texts,
        bids=bid_array,
        payments=pay,
        names=list(names),
    )
