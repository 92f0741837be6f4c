"""Prompt formats: a multiple-choice example → per choice, (context, continuation) to score.

- `mcq` (the paper's): options lettered A..H after the question; the continuations are the letters.
- `completion` (lm-evaluation-harness 0.4's multiple_choice requests): each continuation is " " +
  the choice's text after the task's prompt; a cloze task (`dataset.prompt.blank`, winogrande)
  puts the choice in the context instead (partial scoring), so its choices share the continuation.

The text of each format is a Jinja2 template of the dataset config (`dataset.prompt`), so the
built-in tasks reproduce lm-eval's prompts and a user's own data gets its own. With
`model.chat_template=true`, each context is wrapped by the tokenizer's chat template and the
continuation loses its leading space (lm-eval's --apply_chat_template). Training uses the gold
choice's pair as the target (loss on the continuation only); evaluation scores every pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from flexora_cli.data.datasets import LETTERS, MCExample
from flexora_cli.data.templates import TemplateError, render
from flexora_cli.errors import ConfigError, DataError
from flexora_cli.settings import DatasetSettings, ModelSettings, PromptSettings

MCQ_TEMPLATE = (
    "{% if context %}{{ context }}\n{% endif %}Question: {{ question }}\n"
    "{% for choice in choices %}{{ letters[loop.index0] }}. {{ choice }}\n{% endfor %}Answer:"
)
"""The paper's lettered prompt: the context, the question, the options A..H, then "Answer:"."""
COMPLETION_TEMPLATE = "{% if context %}{{ context }}\n\n{% endif %}Question: {{ question }}\nAnswer:"
"""lm-eval's generic multiple-choice prompt (piqa's, and race's per question)."""


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


def _render(template: str, variables: dict, example: MCExample, key: str) -> str:
    try:
        return render(template, variables)
    except TemplateError as exc:
        raise DataError(f"{example.where}: dataset.prompt.{key}: {exc}; fix the template") from exc


def _variables(example: MCExample) -> dict:
    return {
        **example.record,
        "context": example.context,
        "question": example.question,
        "choices": example.choices,
        "letters": list(LETTERS[: len(example.choices)]),
    }


def mcq(example: MCExample, prompt: PromptSettings) -> Prompt:
    """The lettered format: the prompt, then " A", " B", … as the continuations."""
    context = _render(prompt.mcq or MCQ_TEMPLATE, _variables(example), example, "mcq")
    letters = [f" {LETTERS[i]}" for i in range(len(example.choices))]
    return Prompt([context] * len(letters), letters, example.gold)


def completion(example: MCExample, prompt: PromptSettings) -> Prompt:
    """lm-eval's multiple_choice request: the prompt, then " " + each choice, normalised by the
    choice's length; or, for a cloze task, each choice filled into the context (acc only)."""
    variables = _variables(example)
    choices = [
        _render(prompt.completion_choice, {**variables, "choice": c}, example, "completion_choice")
        for c in example.choices
    ]
    if prompt.blank:
        sentence = example.context
        if sentence.count(prompt.blank) != 1:
            raise DataError(
                f"{example.where}: the context has {sentence.count(prompt.blank)} blanks "
                f"({prompt.blank!r}), expected exactly one (dataset.prompt.blank)"
            )
        start, _, rest = sentence.partition(prompt.blank)
        contexts = [start + choice for choice in choices]
        return Prompt(contexts, [" " + rest.strip()] * len(contexts), example.gold)
    context = _render(prompt.completion or COMPLETION_TEMPLATE, variables, example, "completion")
    return Prompt(
        [context] * len(choices), [f" {c}" for c in choices], example.gold, [len(c) for c in choices]
    )


def build_prompts(
    examples: list[MCExample],
    prompt: PromptSettings,
    format_name: str,
    chat: Callable[[str], str] | None = None,
) -> list[Prompt]:
    """Every example's prompt in `format_name`, wrapped by `chat` (a chat template) when given."""
    to_prompt = mcq if format_name == "mcq" else completion
    prompts = [to_prompt(example, prompt) for example in examples]
    if chat is None:
        return prompts
    return [
        Prompt(
            [chat(context) for context in p.contexts],
            [c[1:] if c.startswith(" ") else c for c in p.continuations],
            p.gold,
            p.choice_chars,
        )
        for p in prompts
    ]


def model_prompts(
    examples: list[MCExample], dataset: DatasetSettings, format_name: str, tokenizer, model: ModelSettings
) -> list[Prompt]:
    """The prompts search, finetune and eval all score: the dataset's templates in `format_name`,
    inside the model's chat template when model.chat_template is set."""
    return build_prompts(examples, dataset.prompt, format_name, chat_wrapper(tokenizer, model))


def chat_wrapper(tokenizer, model: ModelSettings) -> Callable[[str], str] | None:
    """With model.chat_template: a prompt → the tokenizer's chat template around it as one user
    turn, ready for the assistant's answer. A BOS the template writes is dropped when the
    tokenizer adds its own, so the model sees it once."""
    if not model.chat_template:
        return None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model.chat_template=true: the tokenizer of {model.name_or_path} has no chat template; "
            "set model.chat_template=false (base models), or use an instruct model"
        )
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    @functools.cache
    def wrap(text: str) -> str:
        messages = [{"role": "user", "content": text}]
        wrapped = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return wrapped[len(bos) :] if adds_bos and wrapped.startswith(bos) else wrapped

    return wrap
