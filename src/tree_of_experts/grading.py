"""Answer extraction and grading: GSM8K (the last number) and MATH (math-verify on the whole completion)."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; '-3.' -> '-3'; returns None when there is no number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def gsm8k_gold(answer: str) -> str | None:
    """The number after '####' in a GSM8K solution."""
    if "####" not in answer:
        return None
    return normalize_number(answer.split("####")[-1].strip().split()[0] if answer.split("####")[-1].strip() else "")


def gsm8k_prediction(completion: str) -> str | None:
    """The last number in a completion (after '####' if the model wrote one), normalised."""
    text = completion.split("####")[-1] if "####" in completion else completion
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None: the gold answer of a MATH solution (completions
    are read by math-verify, `math_prediction`)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def math_prediction(completion: str) -> list:
    """math-verify's parse of a whole completion: the \\boxed answers first (``\\boxed{5}``, ``\\boxed 5``), else the
    last LaTeX or plain expression. ``[]`` when nothing parses; else ``[sympy value, answer text]``."""
    from math_verify import parse

    return parse(completion)


def math_equal(prediction: list, gold: str) -> bool:
    """Equivalence of a parsed prediction and a MATH gold answer via math-verify (string match when the gold does
    not parse)."""
    if not prediction:
        return False
    from math_verify import parse, verify

    g = parse("$" + gold + "$")
    if not g:
        return str(prediction[-1]).strip() == gold.strip()
    return bool(verify(g, prediction))


def grade(task: str, completion: str, gold: str) -> tuple[str | None, bool]:
    """(extracted prediction, correct) for one completion; ``gold`` is the reference answer string."""
    if task == "gsm8k":
        pred = gsm8k_prediction(completion)
        return pred, pred is not None and pred == normalize_number(gold)
    if task == "math":
        parsed = math_prediction(completion)
        return (str(parsed[-1]) if parsed else None), math_equal(parsed, gold)
    raise ValueError(f"task {task!r} is unknown: use 'gsm8k' or 'math'")
