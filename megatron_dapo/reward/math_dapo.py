"""The DAPO-Math verifier: read the last `Answer:` line, normalise it Minerva-style, compare strings.

As in the DAPO reference: only the last 300 characters of the response are searched, the last
match of `Answer\\s*:\\s*([^\\n]+)` (case-insensitive) is the prediction, and the prediction and
the ground truth are equal after normalisation or the answer is wrong (+1 / -1). Nothing in the
response is ever evaluated: the normalisation is string rewriting, and the only arithmetic is
reducing a fraction of two integer literals.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

TAIL_CHARS = 300
"""Only this many trailing characters of a response are searched for the answer."""

_ANSWER = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Words dropped wherever they stand alone ("12 cm", "5 square units", "$3 dollars"), with an
# optional power (cm^2). Single letters (m, s, g) are left alone: they are often variables.
_UNITS = (
    "units?", "square", "sq", "cubic", "degrees?", "dollars?", "cents?", "percent", "mph", "km", "cm", "mm",
    "meters?", "metres?", "inch(?:es)?", "feet", "foot", "ft", "yards?", "miles?", "hours?", "hrs?", "minutes?",
    "mins?", "seconds?", "secs?", "days?", "weeks?", "years?", "pounds?", "lbs?", "ounces?", "oz", "grams?",
    "kg", "liters?", "litres?", "ways", "points?", "integers?", "digits?", "students?", "people", "times",
)
_UNIT_WORDS = re.compile(r"(?<![a-zA-Z\\])(?:" + "|".join(_UNITS) + r")(?![a-zA-Z])(?:\^\{?[23]\}?)?", re.IGNORECASE)
# \text{..}-like wrappers whose content is kept.
_TEXT_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\(?:,|;|:|\s|quad|qquad)|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_FRAC_ARG = r"(?:\{([^{}]*)\}|([0-9a-zA-Z]))"
_FRAC = re.compile(r"\\frac" + _FRAC_ARG + _FRAC_ARG)
_SQRT = re.compile(r"\\sqrt(?:\{([^{}]*)\}|([0-9a-zA-Z]))")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"([-+]?)(\d*)(?:\.(\d*))?")
_INT = r"[-+]?\d+"
_SIMPLE_FRACTION = re.compile(rf"([-+]?)(?:\\frac\{{({_INT})\}}\{{({_INT})\}}|({_INT})/({_INT}))")


@dataclass(frozen=True)
class MathVerdict:
    score: float
    """+1.0 if the answer equals the ground truth after normalisation, else -1.0."""
    acc: float
    """1.0 if correct, else 0.0."""
    pred: str | None
    """The normalised prediction; None when the response has no `Answer:` line in its tail."""


def compute_score(response: str, ground_truth: str) -> MathVerdict:
    """Score one response against its ground truth (both plain strings)."""
    answer = extract_answer(response)
    if answer is None:
        return MathVerdict(score=-1.0, acc=0.0, pred=None)
    pred = normalize_answer(answer)
    correct = pred != "" and pred == normalize_answer(ground_truth)
    return MathVerdict(score=1.0 if correct else -1.0, acc=1.0 if correct else 0.0, pred=pred)


def extract_answer(response: str) -> str | None:
    """The text after the last `Answer:` in the last TAIL_CHARS characters, up to the end of its line."""
    matches = _ANSWER.findall(response[-TAIL_CHARS:])
    return matches[-1] if matches else None


def normalize_answer(text: str) -> str:
    """Minerva-style canonical form of a final answer, e.g. `$\\boxed{\\dfrac{6}{8}}$ cm.` -> `\\frac{3}{4}`."""
    s = text.replace("\u2212", "-").replace("\u00a0", " ").strip()
    s = _last_boxed_content(s)
    s = s.split("=")[-1]                                    # "x = 5" -> "5"
    s = s.replace("\\$", "").replace("$", "")
    for delim in ("\\(", "\\)", "\\[", "\\]"):
        s = s.replace(delim, "")
    s = _LEFT_RIGHT.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", ",").replace("\\!", "")            # LaTeX thousands: 1{,}000, 1,\!000
    s = _SPACING.sub(" ", s)
    s = _repeat(_TEXT_WRAPPERS, r"\1", s)
    s = _UNIT_WORDS.sub("", s)
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):                             # "1,000" but not "1, 000" (a list)
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = _FRAC.sub(lambda m: "\\frac{%s}{%s}" % (m[1] if m[1] is not None else m[2],
                                                m[3] if m[3] is not None else m[4]), s)
    s = _SQRT.sub(lambda m: "\\sqrt{%s}" % (m[1] if m[1] is not None else m[2]), s)
    while len(s) > 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
        s = s[1:-1]
    return _canonical_number(s)


def _canonical_number(s: str) -> str:
    """Decimal literals lose redundant zeros ("007.50" -> "7.5", "7.0" -> "7"); fractions of two
    integer literals are reduced ("6/8", "\\frac{6}{8}" -> "\\frac{3}{4}", "\\frac{8}{4}" -> "2")."""
    number = _NUMBER.fullmatch(s)
    if number and (number[2] or number[3]):
        sign, whole, decimals = number[1], number[2].lstrip("0") or "0", (number[3] or "").rstrip("0")
        out = whole + ("." + decimals if decimals else "")
        return out if sign != "-" or out == "0" else "-" + out
    fraction = _SIMPLE_FRACTION.fullmatch(s)
    if fraction:
        num, den = (fraction[2], fraction[3]) if fraction[2] is not None else (fraction[4], fraction[5])
        if int(den) != 0:
            value = Fraction(int(num), int(den)) * (-1 if fraction[1] == "-" else 1)
            if value.denominator == 1:
                return str(value.numerator)
            return ("-" if value < 0 else "") + "\\frac{%d}{%d}" % (abs(value.numerator), value.denominator)
    return s


def _last_boxed_content(s: str) -> str:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced), or `s` if there is none."""
    start = max(s.rfind("\\boxed"), s.rfind("\\fbox"))
    if start < 0:
        return s
    brace = s.find("{", start)
    if brace < 0 or s[start:brace].strip() not in ("\\boxed", "\\fbox"):
        return s
    depth = 0
    for pos in range(brace, len(s)):
        depth += {"{": 1, "}": -1}.get(s[pos], 0)
        if depth == 0:
            return s[brace + 1:pos]
    return s[brace + 1:]                                    # unclosed: keep what there is


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _repeat(pattern: re.Pattern, repl: str, s: str) -> str:
    while True:
        out = pattern.sub(repl, s)
        if out == s:
            return out
        s = out
