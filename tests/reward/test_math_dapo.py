import pytest

from megatron_dapo.reward.math_dapo import compute_score, extract_answer, normalize_answer

SOLUTION = "Let us add the two numbers step by step.\nSo the total is clear.\n"


# The DAPO reference's verifier (Minerva's normalisation) is matched exactly, quirks included: these pin it.
@pytest.mark.parametrize(
    ("answer", "ground_truth"),
    [
        ("34", "34"),
        ("$34$", "34"),
        ("\\boxed{34}", "34"),
        ("$\\boxed{34}$.", "34"),                         # the first $...$ span is the answer
        ("x = 34", "34"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("\\$1,234,567", "1234567"),
        ("12 cm", "12"),
        ("12\\text{ cm}^2", "12"),
        ("5 square units", "5"),
        ("5 edges", "5"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("\\frac34", "\\frac{3}{4}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("\\text{Sunday}", "Sunday"),
        ("\\overline{12}", "12"),
        ("an 8", "8"),
        ("1, 000", "1000"),                                # every space goes, then the commas of a digit string
        ("1,2", "12"),
    ],
)
def test_equivalent_forms_are_correct(answer, ground_truth):
    verdict = compute_score(SOLUTION + f"Answer: {answer}", ground_truth)
    assert (verdict.score, verdict.acc) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("answer", "ground_truth"),
    [
        ("35", "34"),
        ("-34", "34"),
        ("\\frac{3}{4}", "\\frac{4}{3}"),
        ("0.75", "\\frac{3}{4}"),
        ("3.4", "34"),
        ("\\times 3", "3"),
        ("", "34"),
        ("cm", ""),                                        # empty after normalising: never correct
        # What the reference does not rewrite, so neither do we:
        ("34.", "34"),
        ("34.0", "34"),
        ("034", "34"),
        ("\u221212", "-12"),                               # unicode minus sign
        ("45\\%", "45"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("3/4", "\\frac{3}{4}"),
        ("\\frac{6}{8}", "\\frac{3}{4}"),
        ("\\(34\\)", "34"),
        ("{34}", "34"),
        ("\\mathbf{34}", "34"),
        ("5 ft", "5"),
    ],
)
def test_different_answers_are_wrong(answer, ground_truth):
    verdict = compute_score(SOLUTION + f"Answer: {answer}", ground_truth)
    assert (verdict.score, verdict.acc) == (-1.0, 0.0)


def test_prediction_is_the_normalised_answer():
    verdict = compute_score(SOLUTION + "Answer: x = $\\boxed{\\frac34}$ dollars.", "\\frac{3}{4}")
    assert verdict.pred == "\\frac{3}{4}"
    assert verdict.score == 1.0


def test_the_last_answer_line_counts():
    right_then_wrong = SOLUTION + "Answer: 34\nWait, let me recheck.\nAnswer: 35"
    wrong_then_right = SOLUTION + "Answer: 35\nWait, let me recheck.\nAnswer: 34"
    assert compute_score(right_then_wrong, "34").score == -1.0
    assert compute_score(right_then_wrong, "34").pred == "35"
    assert compute_score(wrong_then_right, "34").score == 1.0


def test_missing_answer_line_is_wrong():
    verdict = compute_score(SOLUTION + "The answer is 34.", "34")
    assert (verdict.score, verdict.acc, verdict.pred) == (-1.0, 0.0, None)
    assert compute_score("", "34").score == -1.0


def test_only_the_last_300_characters_are_read():
    answer = "Answer: 34\n"
    inside = answer + "x" * (300 - len(answer))            # "Answer" starts exactly 300 characters from the end
    outside = answer + "x" * (301 - len(answer))           # one more character pushes its "A" out
    assert compute_score(inside, "34").score == 1.0
    assert compute_score(outside, "34").score == -1.0
    assert compute_score(outside, "34").pred is None
    # with the "A" cut off, "nswer: 34" is not an answer line
    assert extract_answer(outside) is None


@pytest.mark.parametrize("label", ["answer", "ANSWER", "AnSwEr", "Answer :", "answer:\t"])
def test_the_answer_label_is_case_insensitive(label):
    text = label if label.rstrip().endswith(":") else label + ":"
    assert compute_score(SOLUTION + f"{text} 34", "34").score == 1.0


def test_answer_ends_at_the_line_break():
    assert extract_answer("Answer: 34\nbecause 30 + 4 = 34") == "34"
    assert compute_score("Answer: 34\nbecause 30 + 4 = 34", "34").score == 1.0


def test_model_output_is_never_evaluated():
    # an expression that would be 34 if evaluated is compared as text
    assert compute_score("Answer: 30+4", "34").score == -1.0
    assert compute_score("Answer: __import__('os').getpid()", "34").score == -1.0


@pytest.mark.parametrize(
    ("raw", "normal"),
    [("x = 5", "5"), ("\\frac34", "\\frac{3}{4}"), ("\\frac{10}4", "\\frac{10}4"), ("\\sqrt2x", "\\sqrt{2}x"),
     ("1,000,000", "1000000"), ("7.0", "7.0"), ("12 dollars.", "12."), ("5\\mathrm{th}", "5"), ("\\text{m}", ""),
     ("\\boxed{\\boxed{34}}", "\\boxed{34}"), ("1 \\text{and} 2", "12"), ("a $b$ c $d$", "b")],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal
