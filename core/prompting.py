"""Turning a template, a question and a document into token ids through the model's chat template.

The document can be millions of tokens, so it is never put through the chat template: the template is rendered
with a marker where the document goes and split there, giving the token ids before and after the document.
Templates are plain text with `{document}` and `{question}` fields (package data under `prompts/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from core.errors import UsageError

_MARK = "\u241e\u241eDOCUMENT\u241e\u241e"  # never appears in real prompts


@dataclass
class Prompt:
    prefix: list[int]  # tokens before the document
    suffix: list[int]  # tokens after it, up to where the answer starts


def builtin_template(name: str) -> str:
    return resources.files("prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")


def load_template(name_or_path: str) -> str:
    """A built-in template by name (ask, summarize, ...) or a template file."""
    path = Path(name_or_path)
    if path.suffix and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        try:
            text = builtin_template(name_or_path)
        except FileNotFoundError:
            raise UsageError(f"template '{name_or_path}' is neither a file nor a built-in template") from None
    if "{document}" not in text:
        raise UsageError(f"template '{name_or_path}' has no {{document}} field")
    return text


def build_prompt(tokenizer, template: str, question: str, system: str | None, answer_prefix: str = "") -> Prompt:
    """Render the chat template around a document marker and tokenize the two sides."""
    try:
        user = template.replace("{question}", question).replace("{document}", _MARK)
    except (KeyError, ValueError) as err:
        raise UsageError(f"bad template: {err}") from None
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models: a plain transcript the model can continue
        text = (f"{system}\n\n" if system else "") + user + "\n\nAnswer:"
    text += answer_prefix
    before, after = text.split(_MARK)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    prefix = encode(before)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not prefix or prefix[0] != bos):
        prefix = [bos] + prefix
    return Prompt(prefix, encode(after))
