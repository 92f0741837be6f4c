"""Prompt formats: a multiple-choice example → (context, one continuation per choice).

Training uses `continuations[gold]` as the target (loss on its tokens only); evaluation scores
every continuation by log-likelihood. A format is one small function, registered by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flexora_cli.data.datasets import MCExample

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Prompt:
    context: str
    continuations: list[str]
    gold: int


def mcq(example: MCExample) -> Prompt:
    """The paper's lettered format: options labelled A..D after the question, answer with the letter."""
    lines = [example.context] if example.context else []
    lines.append(f"Question: {example.question}")
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(example.choices)]
    lines.append("Answer:")
    letters = [f" {LETTERS[i]}" for i in range(len(example.choices))]
    return Prompt("\n".join(lines), letters, example.gold)


FORMATS: dict[str, Callable[[MCExample], Prompt]] = {"mcq": mcq}


def build_prompts(examples: list[MCExample], format_name: str) -> list[Prompt]:
    to_prompt = FORMATS[format_name]
    return [to_prompt(example) for example in examples]
