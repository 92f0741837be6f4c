"""SFT rows: each format → the chat template's own tokens, the loss mask on the assistant turns
only (multi-turn too), truncation from the prompt side with a count, and the packed loss equal
to one row at a time."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from flexora_cli.config import load
from flexora_cli.data.collate import pack_rows
from flexora_cli.data.conversations import alpaca_prompt, parse_conversations
from flexora_cli.data.sft import sft_rows
from flexora_cli.errors import ConfigError, DataError
from flexora_cli.settings import ModelSettings, SftSettings
from tests.test_own_data import CHAT_TEMPLATE
from tests.test_step import assert_batch_equals_each_row_alone

CHAT = ModelSettings(name_or_path="demo", chat_template=True)
PLAIN = ModelSettings(name_or_path="demo", chat_template=False)
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add two and two."},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three more?"},
    {"role": "assistant", "content": "Seven."},
]


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    """The demo's byte-level BPE tokenizer, with a chat template as an instruct model has."""
    tokenizer = AutoTokenizer.from_pretrained(f"{demo_dir}/model")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def by_hand(tokenizer, turns: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(turns, tokenize=True)["input_ids"])


def rows_of(spec: SftSettings, raw: list[dict], tokenizer, model=CHAT, max_length=1024):
    conversations = parse_conversations(spec, [(f"data.jsonl row {i}", r) for i, r in enumerate(raw, 1)])
    return sft_rows(conversations, tokenizer, model, max_length)


@pytest.mark.parametrize(
    ("spec", "row"),
    [
        (SftSettings(format="alpaca"), {"instruction": "Add two and two.", "input": "", "output": "Four."}),
        (
            SftSettings(format="prompt_response", prompt="{{ q }} two.", response="a"),
            {"q": "Add two and", "a": "Four."},
        ),
        (SftSettings(format="messages"), {"messages": TURNS[1:3]}),
        (
            SftSettings(format="sharegpt"),
            {
                "conversations": [
                    {"from": "human", "value": TURNS[1]["content"]},
                    {"from": "gpt", "value": "Four."},
                ]
            },
        ),
    ],
    ids=["alpaca", "prompt_response", "messages", "sharegpt"],
)
def test_each_format_gives_the_chat_templates_tokens(tokenizer, spec, row):
    [built], truncation = rows_of(spec, [row], tokenizer)
    assert built.input_ids == by_hand(tokenizer, TURNS[1:3]) and truncation.describe(1024) is None
    assert tokenizer.decode([t for t in built.labels if t != -100]) == "Four.\n"


def test_alpaca_input_and_system_prompt(tokenizer):
    spec = SftSettings(format="alpaca", system="Be brief.")
    [built], _ = rows_of(
        spec, [{"instruction": "Add", "input": "two and two.", "output": "Four."}], tokenizer
    )
    expected = [TURNS[0], {"role": "user", "content": "Add\n\ntwo and two."}, TURNS[2]]
    assert built.input_ids == by_hand(tokenizer, expected)


def test_mask_covers_exactly_the_assistant_turns_of_a_multi_turn_conversation(tokenizer):
    [built], _ = rows_of(SftSettings(format="messages"), [{"messages": TURNS}], tokenizer)
    assert built.input_ids == by_hand(tokenizer, TURNS)
    trained = [i for i, label in enumerate(built.labels) if label != -100]
    spans = [trained[0]] + [b for a, b in zip(trained, trained[1:]) if b != a + 1]
    assert len(spans) == 2  # two separate assistant turns, nothing between them trained
    assert tokenizer.decode([built.input_ids[i] for i in trained]) == "Four.\nSeven.\n"
    # everything else (system, user turns, the role markers) carries no loss
    untrained = tokenizer.decode([t for t, label in zip(built.input_ids, built.labels) if label == -100])
    assert (
        untrained
        == "<|system|>\nBe brief.\n<|user|>\nAdd two and two.\n<|assistant|>\n<|user|>\nAnd three more?\n<|assistant|>\n"
    )


def test_base_model_rows_use_alpacas_prompt_and_end_with_eos(tokenizer):
    row = {"instruction": "Add", "input": "two and two.", "output": "Four."}
    [built], _ = rows_of(SftSettings(format="alpaca"), [row], tokenizer, model=PLAIN)
    text = tokenizer.decode(built.input_ids)
    assert text == alpaca_prompt("Add", "two and two.") + "Four." + tokenizer.eos_token
    assert built.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode([t for t in built.labels if t != -100]).strip() == "Four." + tokenizer.eos_token


def test_truncation_cuts_the_prompt_side_first_and_counts(tokenizer):
    long_prompt = {"instruction": "word " * 60, "output": "Four."}
    long_answer = {"instruction": "Add.", "output": "word " * 60}
    short = {"instruction": "Add.", "output": "Four."}
    whole, _ = rows_of(SftSettings(), [long_prompt, long_answer, short], tokenizer)
    cap = len(whole[2]) + 4
    rows, truncation = rows_of(SftSettings(), [long_prompt, long_answer, short], tokenizer, max_length=cap)
    assert [len(r) for r in rows] == [cap, cap, len(whole[2])] and rows[2] == whole[2]
    assert (truncation.prompt_cut, truncation.response_cut) == (1, 1)
    assert rows[0].input_ids[0] == whole[0].input_ids[0]  # the first token stays
    assert (
        rows[0].input_ids[-10:] == whole[0].input_ids[-10:]
        and rows[0].answer_tokens == whole[0].answer_tokens
    )
    first_trained = next(i for i, label in enumerate(whole[1].labels) if label != -100)
    # its whole prompt went (but the first token), then the end of its response
    assert rows[1].input_ids == (whole[1].input_ids[:1] + whole[1].input_ids[first_trained:])[:cap]
    assert truncation.describe(cap).startswith(
        f"2 of 3 rows are longer than max_length={cap}: 1 lost the start"
    )


@pytest.mark.parametrize(
    ("spec", "row", "problem"),
    [
        (SftSettings(), {"instruction": "Add."}, "data.jsonl row 1, column 'output': missing"),
        (SftSettings(), {"instruction": "Add.", "output": "  "}, "data.jsonl row 1, column 'output': empty"),
        (
            SftSettings(format="messages"),
            {"messages": [{"role": "bot", "content": "hi"}]},
            "column 'messages': turn 1 has unknown role 'bot'; use one of system, user, assistant, tool",
        ),
        (SftSettings(format="messages"), {"messages": []}, "column 'messages': expected a non-empty list"),
        (
            SftSettings(format="sharegpt"),
            {"conversations": [{"from": "human", "value": "hi"}]},
            "column 'conversations': no assistant turn with text",
        ),
        (
            SftSettings(format="prompt_response", prompt="{{ q }}", response="{% if 0 %}x{% endif %}"),
            {"q": "Add."},
            "template '{% if 0 %}x{% endif %}': renders nothing; fix the template",
        ),
    ],
)
def test_bad_rows_name_row_and_column(tokenizer, spec, row, problem):
    with pytest.raises(DataError, match=None) as caught:
        rows_of(spec, [row], tokenizer)
    assert problem in str(caught.value)


def test_chat_data_needs_a_chat_template(tokenizer, tiny_cfg):
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    with pytest.raises(ConfigError, match="has no chat template"):
        rows_of(SftSettings(format="messages"), [{"messages": TURNS}], bare)
    with pytest.raises(ConfigError) as refused:
        load(tiny_cfg("dataset.task=sft", "dataset.sft.format=messages"))
    assert str(refused.value) == (
        "invalid settings: dataset.sft.format=messages: chat data is rendered by the tokenizer's "
        "chat template; set model.chat_template=true (an instruct model's tokenizer)"
    )


def test_packed_loss_and_gradients_equal_each_conversation_alone(tokenizer, tiny_cfg):
    """float32: multi-turn rows (separate trained spans) packed together give the loss and the
    LoRA and α gradients of one row at a time through the model's own forward, to 1e-5."""
    raw = [{"messages": TURNS}, {"messages": TURNS[1:3]}, {"messages": TURNS[1:]}]
    rows, _ = rows_of(SftSettings(format="messages"), raw, tokenizer)
    batch = pack_rows(rows, tokenizer.pad_token_id or 0, 4096, 1)
    assert batch.input_ids.shape[0] == 1  # one pack: the rows sit side by side
    assert_batch_equals_each_row_alone(load(tiny_cfg()), rows, batch)
