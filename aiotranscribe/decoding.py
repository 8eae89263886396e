"""A request's decoding options (language, task, target language, punctuation), checked
against what the chosen model can do (its capabilities, reported by its worker at load).

What comes out is exactly what reaches the model: empty for models that take no prompt
(a language is then only a hint, echoed in the result), and for prompted models (Canary) the
values its prompt is built from. Jobs with different options never share a batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TRANSCRIBE, TRANSLATE = "transcribe", "translate"
TASKS = (TRANSCRIBE, TRANSLATE)
TRUE = {"true", "1", "yes", "on"}
FALSE = {"false", "0", "no", "off"}
# ISO 639-1 as the OpenAI API takes it; a region (en-US, pt_BR) is accepted and dropped.
LANGUAGE = re.compile(r"^([a-z]{2,3})(?:[-_][a-z0-9]{2,8})?$")


class OptionError(ValueError):
    """A decoding option the request or the model cannot have (HTTP 400)."""

    def __init__(self, code: str, param: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.param, self.detail = code, param, detail


def _language(param: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    match = LANGUAGE.match(value.strip().lower())
    if match is None:
        raise OptionError(
            "bad_request", param, f"{param} must be an ISO 639-1 code such as en, not {value!r}"
        )
    return match.group(1)


def requested(fields: Mapping[str, str]) -> dict[str, Any]:
    """The decoding options a form names (syntax only; ``allowed`` checks them against the
    model)."""
    options: dict[str, Any] = {}
    if (language := _language("language", fields.get("language"))) is not None:
        options["language"] = language
    target = _language("target_language", fields.get("target_language"))
    if target is not None:
        options["target_language"] = target
    task = (fields.get("task") or "").strip().lower()
    if task:
        if task not in TASKS:
            raise OptionError(
                "bad_request", "task", f"task must be transcribe or translate, not {task!r}"
            )
        options["task"] = task
    punctuation = (fields.get("punctuation") or "").strip().lower()
    if punctuation:
        if punctuation not in TRUE | FALSE:
            raise OptionError(
                "bad_request",
                "punctuation",
                f"punctuation must be true or false, not {punctuation!r}",
            )
        options["punctuation"] = punctuation in TRUE
    return options


def allowed(options: dict[str, Any], model: str, caps: dict[str, Any] | None) -> dict[str, Any]:
    """The options that reach ``model`` (capabilities ``caps``; None while unknown), or
    ``OptionError`` (``unsupported_language``, ``unsupported_task``) listing what it can do."""
    if caps is None:
        return dict(options)
    options = dict(options)
    tasks = list(caps.get("tasks") or [TRANSCRIBE])
    target = options.get("target_language")
    if "task" not in options and target is not None and target != options.get("language", target):
        options["task"] = TRANSLATE  # a target language other than the spoken one
    task = options.get("task", TRANSCRIBE)
    if task not in tasks:
        raise OptionError(
            "unsupported_task",
            "task",
            f"model {model!r} cannot {task}; it can: {', '.join(tasks)}",
        )
    languages = caps.get("languages")
    for param in ("language", "target_language"):
        code = options.get(param)
        if code is not None and languages is not None and code not in languages:
            raise OptionError(
                "unsupported_language",
                param,
                f"model {model!r} does not support {param} {code!r}; it supports: "
                f"{', '.join(languages)}",
            )
    if task == TRANSCRIBE and target is not None and target != options.get("language", target):
        raise OptionError(
            "bad_request",
            "target_language",
            "task=transcribe with a target_language other "
            "than the language: ask for task=translate",
        )
    if "punctuation" in options and not caps.get("punctuation"):
        raise OptionError(
            "unsupported_option",
            "punctuation",
            f"model {model!r} cannot switch punctuation on or off",
        )
    if TRANSLATE not in tasks and not caps.get("punctuation"):
        # No prompt: the model decodes every request the same way; a language is a hint.
        return {}
    return options
