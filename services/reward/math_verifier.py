"""The math verifier: a completion's numeric final answer against the prompt's.

Where the final answer is, in order:

1. after the last ``####`` (GSM8K's marker): the first number there;
2. inside the last ``\\boxed{...}``: the first number there;
3. otherwise the last number anywhere in the text.

Reasoning inside ``<think>...</think>`` is skipped: only what follows the
last ``</think>`` is read. A number may carry a sign (``-``, ``+``, Unicode
minus), thousands separators (``1,234``; LaTeX ``1{,}234``), decimals, an
exponent, and be a simple fraction (``3/4``, ``\\frac{3}{4}``, ``\\dfrac``);
currency and percent signs around it are dropped (``$1,234.50``, ``15%``).
The reference answer is read the same way, so a GSM8K solution (``... #### 72``)
and a bare ``72`` both work as ``Prompt.answer``.

Numbers become exact ``Fraction``s and match when
``|predicted - reference| <= tolerance * max(1, |reference|)``. Text is model
output or user data: only its last ``MAX_TEXT_CHARS`` are read, the patterns
do not backtrack over the same characters twice, a number
longer than ``MAX_NUMBER_CHARS`` is not read, and exponents are bounded, so
no completion can make parsing slow or huge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

GSM8K_MARKER = "####"
BOXED_OPENERS = ("\\boxed{", "\\fbox{")
THINK_END = "</think>"
MAX_NUMBER_CHARS = 64  # a longer digit run is not an answer (and would be slow to make exact)
MAX_EXPONENT = 100

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # 1,234,567 or 1234567 (",\d{3}" groups only)
_UNSIGNED = rf"(?:{_DIGITS}(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{{1,3}}(?!\d))?"
# A sign only where it cannot be a minus between two operands ("5-3" is 5 and 3);
# no letter or dot right before a number ("Q3", "v1.2" are not answers).
NUMBER_PATTERN = re.compile(
    rf"(?<![\w.])(?:(?<![\w)\]}}])[-+])?{_UNSIGNED}(?:\s*/\s*{_DIGITS}(?!\.?\d))?"
)
# Each brace's content taken whole, then stripped: no two parts of the pattern compete for the same
# spaces (that backtracked quadratically and worse on "\frac{" + many spaces).
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
MAX_TEXT_CHARS = 20_000  # a final answer sits at the end: only this much of a text's end is read
_REMOVED = ("{,}", "\\,", "\\!", "\\;", "\\ ", "\\$", "$", "\\%", "%", "\\left", "\\right", "€", "£")


@dataclass(frozen=True)
class MathVerdict:
    """``predicted``: the completion's final answer (None: none found);
    ``correct``: it matches the reference."""

    correct: bool
    predicted: Fraction | None


def verify(text: str, reference: str, tolerance: float = 1e-6) -> MathVerdict:
    """Does ``text``'s final answer equal ``reference``'s (within ``tolerance``)?
    Raises ``ValueError`` when the reference has no number."""
    expected = final_answer(reference)
    if expected is None:
        raise ValueError(f"the reference answer {_shorten(reference)!r} holds no number")
    predicted = final_answer(text)
    return MathVerdict(correct=predicted is not None and numbers_match(predicted, expected, tolerance),
                       predicted=predicted)


def numbers_match(predicted: Fraction, expected: Fraction, tolerance: float) -> bool:
    return abs(predicted - expected) <= Fraction(tolerance) * max(Fraction(1), abs(expected))


def final_answer(text: str) -> Fraction | None:
    """The final answer of ``text`` (see the module doc), None when there is none."""
    text = after_thinking(text)[-MAX_TEXT_CHARS:]
    marked = text.rfind(GSM8K_MARKER)
    if marked >= 0:
        return first_number(text[marked + len(GSM8K_MARKER):])
    boxed = last_boxed(text)
    if boxed is not None:
        return first_number(boxed)
    return last_number(text)


def has_answer_marker(text: str) -> bool:
    """A final answer in the expected form: a number after ``####`` or in ``\\boxed{}``."""
    text = after_thinking(text)[-MAX_TEXT_CHARS:]
    marked = text.rfind(GSM8K_MARKER)
    if marked >= 0:
        return first_number(text[marked + len(GSM8K_MARKER):]) is not None
    boxed = last_boxed(text)
    return boxed is not None and first_number(boxed) is not None


def after_thinking(text: str) -> str:
    """What follows the last ``</think>`` (all of ``text`` without one)."""
    end = text.rfind(THINK_END)
    return text if end < 0 else text[end + len(THINK_END):]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), None if none closes."""
    start = max(text.rfind(opener) for opener in BOXED_OPENERS)
    if start < 0:
        return None
    content_start = text.index("{", start) + 1
    depth = 1
    for index in range(content_start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[content_start:index]
    return None


def first_number(text: str) -> Fraction | None:
    for match in NUMBER_PATTERN.finditer(normalize(text)):
        return to_fraction(match.group())
    return None


def last_number(text: str) -> Fraction | None:
    last = None
    for match in NUMBER_PATTERN.finditer(normalize(text)):
        last = match
    return to_fraction(last.group()) if last is not None else None


def normalize(text: str) -> str:
    """LaTeX fractions as ``a/b``; unit signs and LaTeX spacing dropped."""
    text = text.replace("\u2212", "-")  # Unicode minus
    text = _FRAC.sub(lambda match: f"{match[1].strip()}/{match[2].strip()}", text)
    for removed in _REMOVED:
        text = text.replace(removed, "")
    return text


def to_fraction(number: str) -> Fraction | None:
    """One matched number (``-1,234.5``, ``3/4``, ``2e3``) as a Fraction; None
    when it is too long to be an answer or divides by zero."""
    number = number.replace(",", "").replace(" ", "")
    if len(number) > MAX_NUMBER_CHARS:
        return None
    numerator, _, denominator = number.partition("/")
    try:
        value = _decimal(numerator)
        if denominator:
            divisor = _decimal(denominator)
            return value / divisor if divisor != 0 else None
        return value
    except ValueError:
        return None


def _decimal(text: str) -> Fraction:
    exponent = text.lower().partition("e")[2]
    if exponent and abs(int(exponent)) > MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} is out of range")
    return Fraction(text)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
