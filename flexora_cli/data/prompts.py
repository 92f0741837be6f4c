"""Prompt formats: a multiple-choice example → per choice, (context, continuation) to score.

- `mcq` (the paper's): options lettered A..D after the question; the continuations are the letters.
- `completion` (lm-evaluation-harness 0.4 task conventions): each continuation is " " + the choice
  text after a task-specific context; winogrande puts the option in the context instead (partial
  scoring), so its choices share the continuation and differ in context.

Training uses the gold choice's pair as the target (loss on the continuation only); evaluation
scores every pair by log-likelihood. A format is a small function, registered by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flexora_cli.data.datasets import MCExample

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Prompt:
    """What gets scored for one example."""

    contexts: list[str]
    """One context per choice; identical unless the format scores partially (winogrande)."""
    continuations: list[str]
    """One continuation per choice, scored as the sum of its tokens' log-probabilities."""
    gold: int
    choice_chars: list[int] | None = None
    """Characters per choice, the acc_norm denominator; None where acc_norm is undefined."""


def _shared_context(context: str, choices: list[str], gold: int) -> Prompt:
    """lm-eval's multiple_choice request: context, then " " + choice, normalised by len(choice)."""
    return Prompt([context] * len(choices), [f" {c}" for c in choices], gold, [len(c) for c in choices])


def mcq(example: MCExample) -> Prompt:
    """The paper's lettered format: options labelled A..D after the question, answer with the letter."""
    lines = [example.context] if example.context else []
    lines.append(f"Question: {example.question}")
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(example.choices)]
    lines.append("Answer:")
    context = "\n".join(lines)
    letters = [f" {LETTERS[i]}" for i in range(len(example.choices))]
    return Prompt([context] * len(letters), letters, example.gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag clean-up of WikiHow artefacts, step for step."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _completion_hellaswag(example: MCExample) -> Prompt:
    record = example.record
    context = f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}"
    choices = [hellaswag_preprocess(ending) for ending in record["endings"]]
    return _shared_context(hellaswag_preprocess(context), choices, example.gold)


def _completion_piqa(example: MCExample) -> Prompt:
    return _shared_context(f"Question: {example.question}\nAnswer:", example.choices, example.gold)


def _completion_winogrande(example: MCExample) -> Prompt:
    sentence = example.context
    blank = sentence.index("_")
    contexts = [sentence[:blank] + option for option in example.choices]
    continuation = " " + sentence[blank + 1 :].strip()
    return Prompt(contexts, [continuation] * len(contexts), example.gold)


def _completion_race(example: MCExample) -> Prompt:
    # One prompt per question, unless dataset.race_grouping=article made the example lm-eval's
    # (the last question of an article, earlier ones answered in the context).
    context = example.record.get("lm_eval_text")
    if context is None:
        context = f"Article: {example.record['article']}\n\nQuestion: {example.question}\nAnswer:"
    return _shared_context(context, example.choices, example.gold)


_COMPLETION: dict[str, Callable[[MCExample], Prompt]] = {
    "hellaswag": _completion_hellaswag,
    "piqa": _completion_piqa,
    "winogrande": _completion_winogrande,
    "race": _completion_race,
}


def completion(example: MCExample) -> Prompt:
    """lm-evaluation-harness 0.4's zero-shot prompt for the example's task."""
    return _COMPLETION[example.schema](example)


FORMATS: dict[str, Callable[[MCExample], Prompt]] = {"mcq": mcq, "completion": completion}


def build_prompts(examples: list[MCExample], format_name: str) -> list[Prompt]:
    to_prompt = FORMATS[format_name]
    return [to_prompt(example) for example in examples]
