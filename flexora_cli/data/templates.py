"""Jinja2 templates for dataset columns and prompts, rendered the way lm-eval renders doc_to_text.

A string is a template when it holds `{{` or `{%`; otherwise it names a column. Templates run in
Jinja's sandbox (dataset configs can come from anyone) with StrictUndefined, so a misspelt column
is an error rather than an empty string.
"""

from __future__ import annotations

import functools
import re

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateError", "hellaswag_preprocess", "is_template", "render"]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag clean-up of WikiHow artefacts, step for step."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def is_template(source: str) -> bool:
    return "{{" in source or "{%" in source


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    environment.filters["hellaswag_preprocess"] = hellaswag_preprocess
    return environment


@functools.lru_cache(maxsize=256)
def _compiled(source: str):
    return _environment().from_string(source)


def render(source: str, variables: dict) -> str:
    """The template rendered over `variables`; TemplateError (with Jinja's message) when it fails."""
    try:
        return _compiled(source).render(variables)
    except TemplateError:
        raise
    except Exception as exc:  # a filter raising on a bad value (e.g. int of "x")
        raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
