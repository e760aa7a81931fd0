"""Turning a template, a question and a document into token ids through the model's chat template.

The document can be millions of tokens, so it is never put through the chat template: the template is rendered
with a marker where the document goes and split there, giving the token ids before and after the document.
Templates are plain text with `{document}` and `{question}` fields (package data under `prompts/`), and may
hold a `{passages}` field after the document: where the passages the question's words point at are re-read
(Session.answer renders them; the field is empty when there are none).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from infllm.errors import ModelError, UsageError

_MARK = "\u241e\u241eDOCUMENT\u241e\u241e"  # never appears in real prompts
_SLOT = "\u241e\u241ePASSAGES\u241e\u241e"

SUMMARY_REQUEST = ("Summarize the whole document in a few short paragraphs, from its beginning to its end: "
                   "who or what it is about, and its main parts in order.")


@dataclass
class Prompt:
    prefix: list[int]  # tokens before the document
    suffix: list[int]  # tokens after it, up to where the answer starts
    # Another question asked the same way (template, system prompt); citations use it for probe questions.
    ask: Callable[[str], "Prompt"] | None = field(default=None, compare=False, repr=False)
    question: str = ""  # the question's own words (not the template's): what the lexical index matches
    slot: int | None = None  # suffix[:slot] comes before the template's {passages} field; None: it has none
    # Strings that would begin the template over again (its question line, its document tags): an answer that
    # reaches one has stopped answering and is echoing the prompt, so it ends there.
    stops: tuple[str, ...] = ()

    def with_passages(self, passages: list[int]) -> list[int]:
        """The suffix with re-read passages' tokens in the template's {passages} field, or before the suffix
        (the document's end) when the template has none."""
        if self.slot is None:
            return list(passages) + list(self.suffix)
        return list(self.suffix[: self.slot]) + list(passages) + list(self.suffix[self.slot :])


def builtin_template(name: str) -> str:
    return resources.files("infllm.prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")


BUILTIN_TEMPLATES = ("ask", "summarize")


def load_template(name_or_path: str) -> str:
    """A built-in template by name (ask, summarize) or a template file of any name (./ask is the file, ask the
    built-in). It must hold {document} and {question}: without the latter the question never reaches the model."""
    path = Path(name_or_path)
    if name_or_path in BUILTIN_TEMPLATES:
        text = builtin_template(name_or_path)
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = "is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"cannot be read ({err.strerror})"
            raise UsageError(f"template file '{name_or_path}' {reason}") from None
    else:
        what = "is not a file" if path.exists() else "is neither a file nor a built-in template"
        raise UsageError(f"template '{name_or_path}' {what} (built-in: {', '.join(BUILTIN_TEMPLATES)})")
    for field in ("{document}", "{question}"):
        if field not in text:
            raise UsageError(f"template '{name_or_path}' has no {field} field")
    if _passages_misplaced(text):
        raise UsageError(f"template '{name_or_path}' {PASSAGES_PLACE}")
    return text


PASSAGES_PLACE = "may hold the {passages} field once, after {document}"


def _passages_misplaced(template: str) -> bool:
    return template.count("{passages}") > 1 or 0 <= template.find("{passages}") < template.find("{document}")


NO_CHAT_TEMPLATE = ("the model's tokenizer has no chat template, so the prompt is a plain transcript ending in "
                    "'Answer:'; fine for a base model, but a chat model answers poorly without its template "
                    "(its chat_template.jinja, or chat_template in tokenizer_config.json)")


def has_chat_template(tokenizer) -> bool:
    """Whether build_prompt can use the model's own chat format (else it falls back to a plain transcript)."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, template: str, question: str, system: str | None, answer_prefix: str = "") -> Prompt:
    """Render the chat template around a document marker and tokenize the two sides."""
    try:
        # The fields before the question, so that a question quoting "{document}" stays text.
        user = template.replace("{document}", _MARK).replace("{passages}", _SLOT).replace("{question}", question)
    except (KeyError, ValueError) as err:
        raise UsageError(f"bad template: {err}") from None
    if user.count(_MARK) != 1:
        raise UsageError("the template must hold the {document} field exactly once")
    if _passages_misplaced(template):
        raise UsageError(f"the template {PASSAGES_PLACE}")
    if has_chat_template(tokenizer):
        text = _render_chat(tokenizer, system, user)
    else:  # base models: a plain transcript the model can continue
        text = (f"{system}\n\n" if system else "") + user + "\n\nAnswer:"
    text += answer_prefix
    if text.count(_MARK) != 1:
        raise ModelError("the model's chat template does not put the user's message into the prompt exactly once; "
                         "pass a template that does (--template) or fix the model's chat_template")
    before, after = text.split(_MARK)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    head, _, tail = after.partition(_SLOT)
    suffix = encode(head) + encode(tail)
    prefix = encode(before)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not prefix or prefix[0] != bos):
        prefix = [bos] + prefix
    return Prompt(prefix, suffix,
                  ask=lambda other: build_prompt(tokenizer, template, other, system, answer_prefix), question=question,
                  slot=len(encode(head)) if _SLOT in after else None, stops=echo_stops(template))


def render_passages(question: str, passages: list[str]) -> str:
    """What fills a template's {passages} field: the question, then the passages numbered, each a paragraph.
    The question comes first so that the model reads them knowing what to look for; the template asks it
    again after them. No line introduces the passages, since the default model restated one as its answer ("The
    document contains passages that may hold the answer."): with such a line 5 of 52 development answers spoke
    of passages and 14 were right, without it none and 20 (docs/benchmarks.md "No line above the re-read
    passages")."""
    numbered = "\n\n".join(f"[{i}] {text.strip()}" for i, text in enumerate(passages, 1))
    return f"Question: {question}\n\n{numbered}\n\n"


_NUMBER = re.compile(r"\s*\[\d+\]\s*")  # a passage number as render_passages writes it, "[4] "
_MAYBE_NUMBER = re.compile(r"\s*(\[\d*\]?)?")  # what may still become one


def without_passage_number(text: str) -> str:
    """An answer's text without a passage number it opens with ("[4] The manual ..." -> "The manual ..."): small
    models start an answer by going on with the numbered passages above the question (11 of 139 answers in the
    runs of docs/benchmarks.md, "Where the re-read passages go, and where an answer stops"). While the text may
    still become such a number ("[", "[4", "[4]"), none of it is shown."""
    if _MAYBE_NUMBER.fullmatch(text):
        return ""
    number = _NUMBER.match(text)
    return text[number.end():] if number else text


def echo_stops(template: str) -> tuple[str, ...]:
    """The template's own markers that an answer must not run into: the start of the line holding {question}
    ("Question:" in the built-in one) at a line start, the document's tags, and where the template has a
    {passages} field a line opening with a passage number as `render_passages` writes them ("[1] ..."; the
    first digit stops "[10]" too). Small models answer, then go on writing the passage list (8 of the 48
    development answers in docs/benchmarks.md, "Where the re-read passages go, and where an answer stops")."""
    numbered = [f"\n[{digit}" for digit in range(1, 10)] if "{passages}" in template else []
    questions, tags = [], []
    for line in template.splitlines():
        lead = line.partition("{question}")[0].replace("{passages}", "").strip()  # the passages end in a new line
        if "{question}" in line and lead and "{" not in lead:
            questions.append("\n" + lead)
        tag = line.strip()
        if tag.startswith("<") and tag.endswith(">") and "{" not in tag:  # <document>, </document>
            tags.append(tag)
    return tuple(dict.fromkeys(questions + tags + numbered))


def _render_chat(tokenizer, system: str | None, user: str) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - templates are code shipped with the model; they raise anything
        if system:
            # Some templates (early Mistral ones) refuse a system turn: put the system text atop the user's.
            try:
                merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
                return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001
                pass
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelError(f"the model's chat template cannot render the prompt: {detail}") from None
