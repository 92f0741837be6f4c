"""Both prompt formats on schema-exact records; `completion` follows lm-eval 0.4 string for string."""

from __future__ import annotations

import pytest

from flexora_cli.config import dataset_preset
from flexora_cli.data import prompts as formats
from flexora_cli.data.datasets import load_split
from flexora_cli.data.prompts import Prompt, build_prompts
from flexora_cli.data.templates import hellaswag_preprocess
from flexora_cli.errors import ConfigError
from flexora_cli.settings import ModelSettings
from tests.data.test_datasets import HELLASWAG, PIQA, RACE, WINOGRANDE, write_split


def prompt_for(task: str, record: dict, tmp_path, format_name: str) -> Prompt:
    """The built-in task's prompt for one record."""
    spec = dataset_preset(task, data_dir=str(write_split(tmp_path, [record])))
    [prompt] = build_prompts(load_split(spec, "train"), spec.prompt, format_name)
    return prompt


def completion(task: str, record: dict, tmp_path) -> Prompt:
    return prompt_for(task, record, tmp_path, "completion")


def test_hellaswag_completion(tmp_path):
    prompt = completion("hellaswag", HELLASWAG, tmp_path)
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize(); choices are the endings, " "-prefixed.
    assert prompt.contexts == ["Roof shingle removal: A man is sitting on a roof. He"] * 4
    assert prompt.continuations[3] == " starts pulling up roofing on a roof."
    assert prompt.choice_chars == [len(e) for e in HELLASWAG["endings"]]
    assert prompt.gold == 3


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  Make tea [title] Boil water.  ", "Make tea. Boil water."),
        ("[header] How to fold [step] Fold it.", " How to fold Fold it."),
        ("a [substeps] b", "a b"),  # the bracket goes, then "  " → " "
        ("a [substeps]  b", "a  b"),  # only one left-to-right pass, as lm-eval does
    ],
)
def test_hellaswag_preprocess(raw, clean):
    assert hellaswag_preprocess(raw) == clean


def test_hellaswag_empty_ctx_b_and_wikihow_artefacts(tmp_path):
    record = {
        **HELLASWAG,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow basil [title] Pick a pot.",
        "ctx_b": "",
        "endings": ["[step] Fill it with soil.", "x", "y", "z"],
    }
    prompt = completion("hellaswag", record, tmp_path)
    assert prompt.contexts[0] == "Home and Garden: How to grow basil. Pick a pot."
    assert prompt.continuations[0] == "  Fill it with soil."  # " " + " Fill it with soil."
    assert prompt.choice_chars[0] == len(" Fill it with soil.")


def test_piqa_completion(tmp_path):
    prompt = completion("piqa", PIQA, tmp_path)
    assert prompt.contexts == [f"Question: {PIQA['goal']}\nAnswer:"] * 2
    assert prompt.continuations == [f" {PIQA['sol1']}", f" {PIQA['sol2']}"]
    assert prompt.choice_chars == [len(PIQA["sol1"]), len(PIQA["sol2"])] and prompt.gold == 0


def test_winogrande_partial_scoring(tmp_path):
    prompt = completion("winogrande", WINOGRANDE, tmp_path)
    assert prompt.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert prompt.continuations == [" always got the harder cases."] * 2
    assert prompt.choice_chars is None and prompt.gold == 0  # acc only, as lm-eval


def test_race_completion(tmp_path):
    prompt = completion("race_high", RACE, tmp_path)
    assert prompt.contexts == [f"Article: {RACE['article']}\n\nQuestion: {RACE['question']}\nAnswer:"] * 4
    assert prompt.continuations == [" Work", " Students", " Food", " Weather"] and prompt.gold == 1


def test_mcq_letters_every_task(tmp_path):
    for task, record in (("hellaswag", HELLASWAG), ("piqa", PIQA), ("winogrande", WINOGRANDE)):
        prompt = prompt_for(task, record, tmp_path, "mcq")
        assert prompt.continuations[:2] == [" A", " B"] and prompt.choice_chars is None
    assert prompt.contexts[0] == (
        f"{WINOGRANDE['sentence']}\nQuestion: Which option best fills the blank (_)?\n"
        "A. Sarah\nB. Maria\nAnswer:"
    )
    assert formats.MCQ_TEMPLATE.startswith("{% if context %}")


def test_race_article_grouping_matches_lm_eval(tmp_path):
    records = [
        {**RACE, "question": "The writer talked with  _  .", "options": ["a", "students", "b", "c"]},
        {**RACE, "question": "Who?", "options": ["x", "y", "Tom", "z"], "answer": "C"},
        {**RACE, "question": "Why?", "answer": "A"},
        {**RACE, "example_id": "high2.txt", "question": "Only one?", "answer": "D"},
    ]
    spec = dataset_preset("race_high", data_dir=str(write_split(tmp_path, records)), race_grouping="article")
    first, second = build_prompts(load_split(spec, "train"), spec.prompt, "completion")
    # lm-eval's preprocess_race.doc_to_text: cloze answers inline, others as Question/Answer lines,
    # then the last question with no "Answer:" after it.
    assert first.contexts[0] == (
        f"Article: {RACE['article']}\n\nThe writer talked with students\nQuestion: Who?\nAnswer: Tom\nWhy?"
    )
    assert first.continuations == [" Work", " Students", " Food", " Weather"] and first.gold == 0
    assert second.contexts[0] == f"Article: {RACE['article']}\n\nOnly one?" and second.gold == 3


class ChatTokenizer:
    """A tokenizer's chat-template surface: a BOS the tokenizer itself adds, and a template."""

    bos_token, bos_token_id, chat_template = "<s>", 1, "…"

    def __call__(self, text):
        return {"input_ids": [1, 5]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<s><|user|>\n{messages[0]['content']}\n<|assistant|>\n"


def test_chat_template_wraps_every_context_once(tmp_path):
    spec = dataset_preset("piqa", data_dir=str(write_split(tmp_path, [PIQA])))
    examples = load_split(spec, "train")
    model = ModelSettings(name_or_path="m", chat_template=True)
    [plain] = build_prompts(examples, spec.prompt, "mcq")
    [chat] = formats.model_prompts(examples, spec, "mcq", ChatTokenizer(), model)
    # BOS dropped (the tokenizer adds it), one user turn; the answer starts the assistant's turn
    assert chat.contexts == [f"<|user|>\n{plain.contexts[0]}\n<|assistant|>\n"] * 2
    assert chat.continuations == ["A", "B"] and chat.gold == plain.gold
    model.chat_template = False
    assert formats.model_prompts(examples, spec, "mcq", ChatTokenizer(), model) == [plain]


def test_chat_template_missing_is_a_config_error(tmp_path):
    spec = dataset_preset("piqa", data_dir=str(write_split(tmp_path, [PIQA])))
    tokenizer = ChatTokenizer()
    tokenizer.chat_template = None
    with pytest.raises(
        ConfigError, match="model.chat_template=true: the tokenizer of m has no chat template"
    ):
        formats.model_prompts(
            load_split(spec, "train"),
            spec,
            "mcq",
            tokenizer,
            ModelSettings(name_or_path="m", chat_template=True),
        )
