"""Plain-text helpers shared by the configurations and the comparisons: what counts as a mention."""

from __future__ import annotations

import re

__all__ = ["mentions"]


def mentions(text: str, word: str) -> bool:
    """Whether ``word`` (a word or phrase) occurs in ``text`` as a whole word, case-insensitively.

    Word boundaries are Unicode word characters: ``mentions("Alpha's deal", "Alpha")`` is True,
    ``mentions("Alphabet", "Alpha")`` is False; any run of whitespace matches the spaces of a phrase
    (``"Alpha  Airlines"`` mentions ``"Alpha Airlines"``). An empty ``word`` is never mentioned. The one
    definition of a mention (:meth:`jaxauction.config.Advertiser.mentioned_in` and
    :func:`jaxauction.compare.mentions` use it).
    """
    words = word.split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None
