"""The DAPO-Math verifier: read the last `Answer:` line, normalise it as Minerva does, compare strings.

As in the DAPO reference: only the last 300 characters of the response are searched, the last
match of `Answer\\s*:\\s*([^\\n]+)` (case-insensitive) is the prediction, and the prediction and
the ground truth are equal after the same normalisation or the answer is wrong (+1 / -1). The
normalisation is the one the Minerva paper published for MATH answers (Lewkowycz et al. 2022,
"Solving Quantitative Reasoning Problems with Language Models", appendix), which the DAPO reference
applies to both sides: its rewrites, its list of dropped words, the first `$...$` span, a few LaTeX
wrappers, shorthand `\\frac12` / `\\sqrt2`, thousands commas. It is applied exactly, quirks included
(`Answer: 42.` is not 42, `1,2` is 12), so that rewards and accuracies compare with the paper's and
with other trainers' DAPO recipes. One difference: a prediction that normalises to nothing is never
correct (the reference would accept it against an empty ground truth). A task that wants a more
lenient reading registers its own function under `reward.functions.math_dapo`.

Nothing in the response is ever evaluated: the normalisation is string rewriting only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_CHARS = 300
"""Only this many trailing characters of a response are searched for the answer."""

_ANSWER = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)

# Minerva's normalisation, in its order. First these literal rewrites (note "a " and "an " go anywhere,
# and every space goes with " ")...
_REWRITES = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
# ...then these substrings are deleted wherever they occur (units, filler, spacing commands)...
_DROPPED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}",
    '"', "\\dots",
)
# ...then a line with a $...$ span keeps that span only; \text{}, \textbf{} and \overline{} keep their first
# brace group's content, \boxed{} everything up to the last closing brace; \frac and \sqrt shorthand get braces.
_FIRST_MATH_SPAN = re.compile(r".*?\$(.*?)\$.*")
_UNWRAP = tuple(re.compile(pattern) for pattern in
                (r"\\text\{(.*?)\}", r"\\textbf\{(.*?)\}", r"\\overline\{(.*?)\}", r"\\boxed\{(.*)\}"))
_SHORT_FRAC = re.compile(r"frac([^{])(.)")
_SHORT_SQRT = re.compile(r"sqrt([^{])")


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
    """Minerva's canonical form of a final answer, e.g. `x = $\\boxed{\\frac34}$` -> `\\frac{3}{4}`."""
    s = text.split("=")[-1]
    for old, new in _REWRITES:
        s = s.replace(old, new)
    for dropped in _DROPPED:
        s = s.replace(dropped, "")
    s = _FIRST_MATH_SPAN.sub(r"$\1$", s)
    for pattern in _UNWRAP:
        s = pattern.sub(r"\1", s)
    s = _SHORT_FRAC.sub(r"frac{\1}{\2}", s)
    s = _SHORT_SQRT.sub(r"sqrt{\1}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():  # 100,000 -> 100000
        s = s.replace(",", "")
    return s.strip()
