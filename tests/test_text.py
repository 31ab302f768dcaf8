"""What counts as a mention: whole words, any case, any whitespace inside a phrase (against hand-made cases)."""

import pytest

from jaxauction import compare, config, text


@pytest.mark.parametrize(
    "sentence, word, expected",
    [
        ("Fly Alpha today", "Alpha", True),
        ("fly ALPHA's planes", "alpha", True),
        ("Alphabet soup", "Alpha", False),
        ("the Betamax", "Beta", False),
        ("Stay at beta   resort", "Beta Resort", True),
        ("Stay at BETA RESORT.", "Beta Resort", True),
        ("Stay at Beta\nResort", "Beta Resort", True),
        ("Stay at BetaResort", "Beta Resort", False),
        ("Café Ünïcode", "ünïcode", True),
        ("a+b costs less", "a+b", True),  # regex characters are literal
        ("aab costs less", "a+b", False),
        ("anything", "", False),
        ("anything", "   ", False),
    ],
)
def test_mentions_match_whole_words_case_insensitively(sentence, word, expected):
    assert text.mentions(sentence, word) is expected


def test_one_definition_of_a_mention():
    assert config.mentions is text.mentions  # the configurations import it; compare maps it over texts and names
    got = compare.mentions(["Fly Alpha", "Beta resort!", "none"], ["alpha", "Beta Resort"])
    assert got.tolist() == [[True, False], [False, True], [False, False]]
