"""Answer extraction and grading: GSM8K (numbers) and MATH (\\boxed{} + math-verify)."""

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
    """Content of the last \\boxed{...} (balanced braces), or None."""
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


def math_equal(prediction: str | None, gold: str) -> bool:
    """Equivalence of two MATH answers via math-verify (falls back to string match if it cannot parse)."""
    if prediction is None:
        return False
    from math_verify import parse, verify

    try:
        g = parse("$" + gold + "$")
        p = parse("$" + prediction + "$")
        if g and p:
            return bool(verify(g, p))
    except Exception:  # math-verify raises on malformed LaTeX; a malformed answer is simply wrong
        pass
    return prediction.strip() == gold.strip()


def grade(task: str, completion: str, gold: str) -> tuple[str | None, bool]:
    """(extracted prediction, correct) for one completion; ``gold`` is the reference answer string."""
    if task == "gsm8k":
        pred = gsm8k_prediction(completion)
        return pred, pred is not None and pred == normalize_number(gold)
    if task == "math":
        pred = last_boxed(completion)
        return pred, math_equal(pred, gold)
    raise ValueError(f"task {task!r} is unknown: use 'gsm8k' or 'math'")
