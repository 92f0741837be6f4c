"""Instruction and chat rows (dataset.task=sft) → conversations of {role, content} turns.

dataset.sft.format says how a row reads: alpaca (instruction, optional input, output),
prompt_response (a column or Jinja2 template each), messages ([{role, content}], OpenAI's) or
sharegpt ([{from, value}]). A row that breaks the mapping is one error naming the file, the row
and the column: no response, an unknown role, an empty conversation, a template that renders
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from flexora_cli.data.rows import Row
from flexora_cli.data.templates import is_template
from flexora_cli.settings import SftSettings

ROLES = {
    "messages": {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"},
    "sharegpt": {"system": "system", "human": "user", "gpt": "assistant", "observation": "tool",
                 "user": "user", "assistant": "assistant"},
}  # fmt: skip
"""Per chat format: the role names a turn may carry → the chat template's role."""
TURN_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{inputs}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
"""Stanford Alpaca's prompt, for base models without a chat template."""


@dataclass(frozen=True)
class Conversation:
    """One SFT example: its turns, in order; the loss is taken on the assistant turns."""

    turns: list[dict]
    """[{role: system|user|assistant|tool, content: text}]."""
    record: dict = field(default_factory=dict, compare=False, repr=False)
    """The row (the partition hashes it; lm-eval tasks on the held-out rows read it)."""
    where: str = field(default="", compare=False)
    plain_prompt: str | None = None
    """The prompt as a base model without a chat template sees it (None: chat formats)."""


def parse_conversations(spec: SftSettings, rows: Iterable[tuple[str, object]]) -> list[Conversation]:
    """Map `(where, row)` pairs to conversations by dataset.sft."""
    to_turns = _chat_turns if spec.format in TURN_KEYS else _pair_turns
    conversations = []
    for where, raw in rows:
        row = Row(raw, where, "dataset.sft")
        turns, plain_prompt = to_turns(row, spec)
        if spec.system is not None and turns[0]["role"] != "system":
            system = row.text(spec.system) if is_template(spec.system) else spec.system
            turns.insert(0, {"role": "system", "content": system})
            plain_prompt = plain_prompt and f"{system}\n\n{plain_prompt}"
        conversations.append(Conversation(turns, row.raw, where, plain_prompt))
    return conversations


def _pair_turns(row: Row, spec: SftSettings) -> tuple[list[dict], str]:
    """One exchange, and its prompt for base models (alpaca's template, or the prompt as it is)."""
    if spec.format == "alpaca":
        instruction = row.text(spec.instruction)
        extra = row.text(spec.input, allow_empty=True).strip() if spec.input in row.raw else ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        plain, response = alpaca_prompt(instruction, extra), row.text(spec.output)
    else:
        prompt, response = row.text(spec.prompt), row.text(spec.response)
        plain = prompt
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], plain


def _chat_turns(row: Row, spec: SftSettings) -> tuple[list[dict], None]:
    column = spec.turns_column
    value = row.value(column)
    if not isinstance(value, list) or not value:
        raise row.fail(
            column, f"expected a non-empty list of turns, got {json.dumps(value, default=str)[:80]}"
        )
    role_key, content_key = TURN_KEYS[spec.format]
    roles = ROLES[spec.format]
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise row.fail(column, f"turn {number} is not an object with '{role_key}' and '{content_key}'")
        if turn[role_key] not in roles:
            raise row.fail(
                column, f"turn {number} has unknown role {turn[role_key]!r}; use one of {', '.join(roles)}"
            )
        content = turn[content_key]
        if not isinstance(content, str):
            raise row.fail(column, f"turn {number}'s {content_key} is not text")
        turns.append({"role": roles[turn[role_key]], "content": content})
    answered = [t for t in turns if t["role"] == "assistant" and t["content"].strip()]
    if not answered:
        raise row.fail(column, "no assistant turn with text (nothing to train on); give each row a response")
    return turns, None


def alpaca_prompt(instruction: str, extra: str) -> str:
    """Stanford Alpaca's prompt around an instruction (and its input)."""
    return ALPACA_PROMPT.format(
        inputs=", paired with an input that provides further context" if extra else "",
        instruction=instruction,
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
