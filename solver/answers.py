"""Final-answer extraction and agreement (pure string logic, pluggable).

An extractor turns a chain's text into its final answer, or None when it gives none. The default
takes the last `\\boxed{...}` (nested braces handled), else the last number in the text. Answers
are compared after `normalize_answer`, so "3", "3.0", "$3$" and "\\boxed{3}" all agree.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "AnswerExtractor",
    "Consensus",
    "answers_agree",
    "consensus",
    "extract_answer",
    "extract_boxed",
    "extract_last_number",
    "normalize_answer",
]


class AnswerExtractor(Protocol):
    """Anything that maps a chain's text to its final answer (None when there is none)."""

    def __call__(self, text: str) -> str | None: ...


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_WRAPPERS = re.compile(r"^(?:\$+|\\\(|\\\[)|(?:\$+|\\\)|\\\])$")
_TEXT_WRAP = re.compile(r"^\\(?:text|mathrm|textbf)\{(.*)\}$")
_ANNOTATION = re.compile(r"<<[^<>]*>>")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close; None if there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        content = _balanced_content(text, match.end())
        if content is not None:
            return content.strip()
    return None


def _balanced_content(text: str, start: int) -> str | None:
    """Text from `start` up to the brace that closes the one just before it (None if unclosed)."""
    depth = 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (integers, decimals, thousands commas, simple fractions),
    outside `<<...>>` annotations: those are tool or calculator spans (GSM8K's `<<48/2=24>>`,
    the rollout simulator's chain markers), not the model's final answer."""
    numbers = _NUMBER.findall(_ANNOTATION.sub(" ", text))
    return numbers[-1] if numbers else None


def extract_answer(text: str) -> str | None:
    """The default extractor: last `\\boxed{}`, else last number, else None."""
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    return extract_last_number(text)


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """A canonical form for comparison: strip wrappers and spaces; numbers in shortest form.
    Cached: a stream repeats the same few answers, and every window normalises them again."""
    text = answer.strip().rstrip(".").strip()
    text = _WRAPPERS.sub("", text).strip()
    inner = _TEXT_WRAP.match(text)
    if inner:
        text = inner.group(1).strip()
    text = re.sub(r"\s+", "", text)
    plain = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    try:
        number = float(plain)
    except ValueError:
        return text
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def answers_agree(first: str | None, second: str | None) -> bool:
    """True iff both are answers and they are equal after normalisation."""
    if first is None or second is None:
        return False
    return normalize_answer(first) == normalize_answer(second)


@dataclass(frozen=True, slots=True)
class Consensus:
    """The most common normalised answer, its votes, and how many answers were cast."""

    answer: str | None
    votes: int
    cast: int

    @property
    def unanimous(self) -> bool:
        return self.cast > 0 and self.votes == self.cast


def consensus(answers: Sequence[str | None]) -> Consensus:
    """Majority vote over the non-None answers (ties go to the answer seen first)."""
    normalized = [normalize_answer(a) for a in answers if a is not None]
    if not normalized:
        return Consensus(answer=None, votes=0, cast=0)
    counts = Counter(normalized)
    best = max(counts, key=lambda a: (counts[a], -normalized.index(a)))
    return Consensus(answer=best, votes=counts[best], cast=len(normalized))
