"""SFT conversations → training rows whose loss is taken on the assistant turns only
(LLaMA-Factory's `train_on_prompt: false`, torchtune's `train_on_input: False`).

- **Tokens.** With model.chat_template the conversation is rendered by the tokenizer's chat
  template and tokenised as `apply_chat_template(tokenize=True)` does (no special tokens added).
  A token is trained on when its first character lies in an assistant turn: the span between the
  rendering of the turns before it (with the generation prompt) and the rendering through it, so
  the turn's end-of-turn marker is learnt too. Without a chat template (base models), the prompt
  is plain text (Conversation.plain_prompt) and the response plus EOS is the target, tokenised as
  the multiple-choice answers are (batches.split_pairs).
- **Truncation.** A row longer than max_length loses tokens from the left (the prompt side),
  after its first token and before its first trained one; one whose trained tokens still do not
  fit loses the end. Every cut row is counted (Truncation), and the stage says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexora_cli.data.batches import split_pairs
from flexora_cli.data.collate import TrainingRow
from flexora_cli.data.conversations import Conversation
from flexora_cli.errors import ConfigError, DataError
from flexora_cli.settings import ModelSettings


@dataclass
class Truncation:
    """Rows cut to max_length: from the prompt side, and (their responses alone too long) at the end."""

    rows: int = 0
    prompt_cut: int = 0
    response_cut: int = 0

    def describe(self, max_length: int) -> str | None:
        """The one line a stage prints (None when nothing was cut)."""
        if not self.prompt_cut and not self.response_cut:
            return None
        return (
            f"{self.prompt_cut + self.response_cut} of {self.rows} rows are longer than "
            f"max_length={max_length}: {self.prompt_cut} lost the start of their prompt, "
            f"{self.response_cut} their prompt and the end of their response; raise max_length to "
            "keep them whole"
        )


def sft_rows(
    conversations: list[Conversation], tokenizer, model: ModelSettings, max_length: int
) -> tuple[list[TrainingRow], Truncation]:
    """Each conversation's training row (labels -100 off the assistant turns), cut to max_length."""
    if model.chat_template:
        rows = _templated_rows(conversations, tokenizer, model)
    else:
        rows = _plain_rows(conversations, tokenizer)
    truncation = Truncation(rows=len(rows))
    return [_truncated(row, max_length, truncation) for row in rows], truncation


def _templated_rows(conversations: list[Conversation], tokenizer, model: ModelSettings) -> list[TrainingRow]:
    """Rows through the tokenizer's chat template, trained on the assistant turns' characters."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model.chat_template=true: the tokenizer of {model.name_or_path} has no chat template; "
            "use an instruct model, or model.chat_template=false with alpaca or prompt_response data"
        )
    texts, spans = zip(*(_rendered(c, tokenizer) for c in conversations))
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for ids, offsets, trained in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        labels = [
            token if any(start <= first < end for start, end in trained) else -100
            for token, (first, _) in zip(ids, offsets)
        ]
        rows.append(TrainingRow(list(ids), labels))
    return rows


def _rendered(conversation: Conversation, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, each assistant turn's character span in it)."""

    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    turns = conversation.turns
    text = render(turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        # Through the last turn is the whole text: no second render of it.
        through = text if i == len(turns) - 1 else render(turns[: i + 1], False)
        start, end = len(render(turns[:i], True)) if i else 0, len(through)
        if not text.startswith(through) or start > end:
            raise DataError(
                f"{conversation.where}: the chat template does not render the turns before an "
                "assistant turn as the start of the whole conversation, so its tokens cannot be "
                "told apart; use a chat template that renders turns in order"
            )
        spans.append((start, end))
    return text, spans


def _plain_rows(conversations: list[Conversation], tokenizer) -> list[TrainingRow]:
    """Base models: the plain prompt as context, the response + EOS as the target."""
    pairs = []
    for conversation in conversations:
        if conversation.plain_prompt is None:
            raise ConfigError(
                f"{conversation.where}: chat data (messages, sharegpt) needs the tokenizer's chat "
                "template; set model.chat_template=true (an instruct model's tokenizer)"
            )
        pairs.append((conversation.plain_prompt, conversation.turns[-1]["content"]))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    split = split_pairs(tokenizer, pairs, max_length=1 << 30)  # cut afterwards, counted
    return [TrainingRow.of(context, answer + eos) for context, answer in split]


def _truncated(row: TrainingRow, max_length: int, truncation: Truncation) -> TrainingRow:
    """`row` cut to max_length: prompt tokens from the left (after the first), then the end."""
    excess = len(row) - max_length
    if excess <= 0:
        return row
    first_trained = next(i for i, label in enumerate(row.labels) if label != -100)
    from_prompt = min(excess, max(0, first_trained - 1))
    ids = row.input_ids[:1] + row.input_ids[1 + from_prompt :]
    labels = row.labels[:1] + row.labels[1 + from_prompt :]
    if from_prompt == excess:
        truncation.prompt_cut += 1
    else:
        truncation.response_cut += 1
    return TrainingRow(ids[:max_length], labels[:max_length])
