"""Answer extraction, normalisation and agreement."""

from __future__ import annotations

import pytest

from clearbudget.solver.answers import (
    answers_agree,
    consensus,
    extract_answer,
    extract_boxed,
    extract_last_number,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{3}", "3"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{ {a}{b} } end", "{a}{b}"),
        (r"\boxed{7} and an unclosed \boxed{8", "7"),
        ("no box here", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_default_falls_back_to_last_number() -> None:
    assert extract_answer("we get 12 then 1,024 apples.") == "1,024"
    assert extract_answer(r"x = 5 so \boxed{42}") == "42"
    assert extract_answer("no digits") is None
    assert extract_last_number("-3.5 and 7/8") == "7/8"


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("3.0", "3"), ("$3$", "3"), (" 3. ", "3"), ("1,024", "1024"), (r"\text{yes}", "yes")],
)
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_agreement_and_consensus() -> None:
    assert answers_agree("3", "3.0")
    assert not answers_agree("3", "4")
    assert not answers_agree(None, "3")
    vote = consensus(["3", "3.0", "4", None])
    assert (vote.answer, vote.votes, vote.cast, vote.unanimous) == ("3", 2, 3, False)
    assert consensus([None]).answer is None
    assert consensus(["5", "$5$"]).unanimous
