"""The question's words steering retrieval: the lexical index, the engine's block prior and `Focus` in a session.

Tiny random models on the CPU: what is checked is which blocks are retrieved and re-read, never what a random
model answers.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from infllm.citations.lexical import LexicalIndex, words
from infllm.citations.passages import SourceMap
from infllm.citations.sentences import best_sentence_start
from infllm.config import EngineConfig
from infllm.documents.prompting import (build_prompt, builtin_template, echo_stops, render_passages,
                                        without_passage_number)
from infllm.errors import UsageError
from infllm.documents.readers import Piece
from infllm.engine.engine import Engine
from infllm.session import PINNED, WORDS_FOCUS, Focus, Session, answer_focus
from tiny_models import tiny_model

CFG = EngineConfig(sinks=16, window=128, block_size=32, repr_keys=4, topk=2, query_chunk=32, cache_blocks=2,
                   prefill_chunk=128)


def test_bm25_scores_follow_the_formula_and_favour_the_rare_word():
    passages = [words("the cat sat on the mat"), words("the dog sat"), words("a zebra and the cat")]
    index = LexicalIndex(passages, k1=1.2, b=0.75)
    scores = index.scores("Where is the zebra?")
    avg = sum(map(len, passages)) / 3

    def term(word, passage):
        df = sum(word in p for p in passages)
        tf = passage.count(word)
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * len(passage) / avg)) if tf else 0.0

    expected = [sum(term(w, p) for w in {"where", "is", "the", "zebra"}) for p in passages]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-6)
    assert int(scores.argmax()) == 2
    assert LexicalIndex.over_spans("ab cd", [(0, 2), (3, 5)]).scores("nothing here").tolist() == [0.0, 0.0]


def test_a_zero_prior_changes_no_logit_and_a_pinned_block_is_retrieved_by_every_layer():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (640,), generator=torch.Generator().manual_seed(3))
    question = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(4))
    engine = Engine(model, CFG)
    engine.feed(ids)
    state = engine.checkpoint()
    plain = engine.feed(question, all_logits=True)
    blocks = engine.layers[0].store.count
    assert blocks > CFG.topk + 2

    engine.restore(state)
    engine.set_block_prior(torch.zeros(blocks))
    assert torch.equal(engine.feed(question, all_logits=True).argmax(-1), plain.argmax(-1))

    retrieved = [set(m.last_retrieved) for m in engine.layers]
    pinned = next(b for b in range(blocks) if not any(b in r for r in retrieved))  # one no layer chose
    engine.restore(state)
    prior = torch.zeros(blocks)
    prior[pinned] = PINNED
    engine.set_block_prior(prior)
    engine.feed(question)
    assert all(pinned in m.last_retrieved for m in engine.layers)
    engine.set_block_prior(None)
    assert all(m.prior is None for m in engine.layers)


@pytest.fixture(scope="module")
def session(tiny_model_dir):
    from infllm.runtime.loading import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    return Session(loaded, CFG)


def test_focus_re_reads_the_passage_that_holds_the_questions_rare_word(session):
    lines = [f"Line {i}: the grass is green and the sky is blue.\n" for i in range(1, 80)]
    lines[20] = "Line 21: the quagga waits at the gate.\n"
    text = "".join(lines)
    tokenizer = session.loaded.tokenizer
    prompt = build_prompt(tokenizer, "{document}\n{question}", "Where does the quagga wait?", None)
    session.read(prompt.prefix, session.tokenize(text), source_map=SourceMap(text, [Piece(text, "n.txt", None, 1)]))
    plain = "".join(session.answer(prompt, 4))
    assert "".join(session.answer(prompt, 4, focus=Focus())) == plain  # inactive: the answer as before

    lexical = session._lexical_scores(prompt.question, session.source_map)
    reread = [text[a:b] for a, b in session._passages(lexical, 1, session.source_map, prompt.question)]
    # its sentence, not the lines around it
    assert [p.strip() for p in reread] == ["Line 21: the quagga waits at the gate."]
    block = "".join(text[a:b] for a, b in session._passages(lexical, 1, session.source_map, prompt.question,
                                                            sentences=False))
    assert "quagga" in block and "grass" in block and block.count("Line") <= 3  # the block around line 21
    cited = "".join(session.answer(prompt, 4, cite=2, focus=Focus(weight=1.0, pins=1, passages=1)))
    assert isinstance(cited, str)
    assert "quagga" in session.citations[0].excerpt  # the citations lead with the block the retrieval was given
    # What the answer re-read is kept with where it lies, for --json.
    assert [(c.source, c.first_line, c.last_line, c.excerpt) for c in session.reread] == [
        ("n.txt", 21, 21, "Line 21: the quagga waits at the gate.")]
    assert [t.strip() for t in session.reread_texts] == ["Line 21: the quagga waits at the gate."]
    assert "".join(session.answer(prompt, 4)) == plain  # and nothing of it stays for the next answer
    assert session.reread == [] and session.reread_texts == []
    # Unsteered retrieval (no focus), yet the citations still rank by the question's words too.
    assert "".join(session.answer(prompt, 4, cite=2)) == plain
    assert any("quagga" in c.excerpt for c in session.citations)
    # Each excerpt starts at its passage's sentence the question's words match best (citations/sentences.py).
    with mock.patch("infllm.session.best_sentence_start", wraps=best_sentence_start) as start:
        "".join(session.answer(prompt, 4, cite=2))
    assert start.call_count == len(session.citations) and start.call_args.args[1] == prompt.question


# ---- where the re-read passages go, and where an answer stops ---------------------------------------------------


def test_the_built_in_template_puts_the_passages_after_the_document_and_asks_again_after_them(session):
    tokenizer = session.loaded.tokenizer
    prompt = build_prompt(tokenizer, builtin_template("ask"), "Where does the quagga wait?", None)
    assert prompt.slot is not None
    marker = tokenizer.encode("[1] the quagga waits", add_special_tokens=False)
    text = tokenizer.decode(prompt.with_passages(marker))
    assert text.index("</document>") < text.index("[1] the quagga") < text.index("Question: Where does the quagga")
    assert tokenizer.decode(prompt.with_passages([])) == tokenizer.decode(prompt.suffix)
    assert "{passages}" not in tokenizer.decode(prompt.suffix)

    plain = build_prompt(tokenizer, "{document}\n{question}", "Where?", None)  # a template without the field
    assert plain.slot is None and plain.with_passages(marker) == marker + plain.suffix
    with pytest.raises(UsageError, match="after {document}"):
        build_prompt(tokenizer, "{passages}{document}\n{question}", "Where?", None)
    with pytest.raises(UsageError, match="once"):
        build_prompt(tokenizer, "{document}{passages}{passages}\n{question}", "Where?", None)


def test_the_passages_follow_the_question_numbered_with_no_line_an_answer_could_restate():
    rendered = render_passages("Where does the quagga wait?", [" At the gate. ", "By the river."])
    assert rendered == "Question: Where does the quagga wait?\n\n[1] At the gate.\n\n[2] By the river.\n\n"


def test_echo_stops_are_the_templates_question_line_document_tags_and_passage_numbers():
    numbered = tuple(f"\n[{d}" for d in range(1, 10))
    assert echo_stops(builtin_template("ask")) == ("\nQuestion:", "<document>", "</document>", *numbered)
    assert echo_stops("{document}\n{question}") == ()
    assert echo_stops("Q: {question}\n{document}") == ("\nQ:",)
    assert echo_stops("{document}\n{passages}{question}") == numbered


def test_an_answer_reads_the_passages_before_its_question_and_stops_where_it_echoes_the_template(session,
                                                                                                    monkeypatch):
    tokenizer, prompt = _read_the_quagga_text(session)
    fed: list[int] = []
    feed = session.engine.feed
    monkeypatch.setattr(session.engine, "feed", lambda ids, **kw: (fed.extend(list(ids)), feed(ids, **kw))[1])
    # The model's choices are scripted: an answer, then the template's next question (what an echo looks like).
    script = iter(tokenizer.encode("At the gate.\nQuestion: Where else?", add_special_tokens=False))
    monkeypatch.setattr("infllm.session.next_token", lambda *a: next(script))
    answer = "".join(session.answer(prompt, 32, focus=Focus(passages=1)))
    assert answer == "At the gate." and session.finish_reason == "stop"
    shown = tokenizer.decode(fed)
    assert shown.index("</document>") < shown.index("quagga waits") < shown.rindex("Question: Where does the quagga")
    assert shown.count("Question: Where does the quagga") == 2  # before the passages, and after them


def test_an_answer_stops_where_it_goes_on_writing_the_passage_list(session, monkeypatch):
    """What the default model did on a git log: answered, then wrote "[4] John Bowman", "[5] ..." to the limit."""
    tokenizer, prompt = _read_the_quagga_text(session)
    script = iter(tokenizer.encode("At the gate.\n\n[4] At the gate.\n\n[5] At", add_special_tokens=False))
    monkeypatch.setattr("infllm.session.next_token", lambda *a: next(script))
    answer = "".join(session.answer(prompt, 32, focus=Focus(passages=1)))
    assert answer == "At the gate." and session.finish_reason == "stop"


def test_an_answer_abandoned_early_leaves_nothing_of_the_one_before(session, monkeypatch):
    tokenizer, prompt = _read_the_quagga_text(session)
    script = iter(tokenizer.encode("At the gate.\nQuestion: Where", add_special_tokens=False))
    monkeypatch.setattr("infllm.session.next_token", lambda *a: next(script))
    assert "".join(session.answer(prompt, 32, focus=Focus(passages=1))) == "At the gate."
    assert session.finish_reason == "stop" and session.answer_logprobs and session.answered_from == "memory"
    script = iter(tokenizer.encode("By the river, where", add_special_tokens=False))
    stream = session.answer(prompt, 32, focus=Focus(passages=1))
    assert "By".startswith(next(stream))  # the caller reads one piece and stops
    assert session.finish_reason == "" and session.answer_logprobs == []


def test_a_passage_number_an_answer_opens_with_is_not_shown():
    assert without_passage_number("[4] The manual says so.") == "The manual says so."
    assert [without_passage_number(t) for t in ("", " ", "[", "[4", "[12]", "[4] ")] == [""] * 6  # may still be one
    assert without_passage_number("[x] marks") == "[x] marks"
    assert without_passage_number("[1, 2] are") == "[1, 2] are"
    assert without_passage_number("Gate [4] here") == "Gate [4] here"


def test_an_answer_that_opens_with_a_passage_number_streams_without_it(session, monkeypatch):
    tokenizer, prompt = _read_the_quagga_text(session)
    script = iter(tokenizer.encode("[4] At the gate.", add_special_tokens=False))
    monkeypatch.setattr("infllm.session.next_token", lambda *a: next(script, session.loaded.tokenizer.eos_token_id))
    pieces = list(session.answer(prompt, 12, focus=Focus(passages=1)))
    assert "".join(pieces) == "At the gate." and all("[" not in piece for piece in pieces)


def test_an_answer_with_passages_is_steered_by_its_words_and_one_without_is_not(session):
    assert answer_focus(0) == Focus()  # summarize, or --passages 0: InfLLM's retrieval alone
    steer = answer_focus(3)
    assert steer.passages == 3 and steer.weight == WORDS_FOCUS.weight and steer.pins == WORDS_FOCUS.pins > 0
    lines = [f"Line {i}: the grass is green and the sky is blue.\n" for i in range(1, 80)]
    lines[20] = "Line 21: the quagga waits at the gate.\n"
    text = "".join(lines)
    prompt = build_prompt(session.loaded.tokenizer, "{document}\n{question}", "Where does the quagga wait?", None)
    session.read(prompt.prefix, session.tokenize(text), source_map=SourceMap(text, [Piece(text, "n.txt", None, 1)]))
    lexical = session._lexical_scores(prompt.question, session.source_map)
    best = lexical[1][int(lexical[0].argmax())]  # the block that holds "quagga"
    "".join(session.answer(prompt, 2, focus=answer_focus(0)))
    assert not all(best in m.last_retrieved for m in session.engine.layers)  # the tiny model's queries miss it
    "".join(session.answer(prompt, 2, focus=answer_focus(1)))
    assert all(best in m.last_retrieved for m in session.engine.layers)  # pinned while answering
    assert all(m.prior is None for m in session.engine.layers)  # and nothing of it stays


def test_the_documents_opening_in_the_sinks_can_be_re_read(session):
    """The first tokens of a document sit in the sinks, in no block: its opening is searched as a passage too."""
    lines = ["The quagga waits at the gate.\n"] + [f"Line {i}: the grass is green and the sky is blue.\n"
                                                   for i in range(2, 80)]
    text = "".join(lines)
    # No word of the question occurs after the opening: the blocks score 0, and none is pinned.
    prompt = build_prompt(session.loaded.tokenizer, "{document}\n{question}", "Where does a quagga wait?", None)
    session.read(prompt.prefix, session.tokenize(text), source_map=SourceMap(text, [Piece(text, "n.txt", None, 1)]))
    layer = session.engine.layers[0]
    assert layer.block_span(session._document_blocks()[0])[0] > session.doc_start + 8  # the opening has no block
    lexical = session._lexical_scores(prompt.question, session.source_map)
    assert lexical is not None and float(lexical[0].abs().max()) == 0
    assert float(session._prior(lexical, answer_focus(3)).max()) < PINNED
    reread = [text[a:b].strip() for a, b in session._passages(lexical, 1, session.source_map, prompt.question)]
    assert reread == ["The quagga waits at the gate."]
    "".join(session.answer(prompt, 2, focus=answer_focus(1)))
    assert [c.excerpt.strip() for c in session.reread] == ["The quagga waits at the gate."]


def test_a_copy_bias_keeps_an_answer_to_the_words_of_its_passages_and_question(session, monkeypatch):
    tokenizer, prompt = _read_the_quagga_text(session)
    chosen: list[int] = []
    pick = __import__("infllm.session", fromlist=["next_token"]).next_token
    monkeypatch.setattr("infllm.session.next_token", lambda *a: (chosen.append(pick(*a)), chosen[-1])[1])
    plain = "".join(session.answer(prompt, 12, focus=Focus(passages=1)))
    unbiased, chosen[:] = list(chosen), []
    "".join(session.answer(prompt, 12, focus=Focus(passages=1, copy_bias=1e4)))
    spans = session._passages(session._lexical_scores(prompt.question, session.source_map), 1, session.source_map,
                              prompt.question)
    texts = [session.source_map.text[a:b] for a, b in spans] + [prompt.question]
    assert [t.strip() for t in texts] == ["Line 21: the quagga waits at the gate.", "Where does the quagga wait?"]
    allowed = {t for text in texts for t in tokenizer.encode(text, add_special_tokens=False)} | session._stops
    assert chosen and set(chosen) <= allowed  # a random model's answer, held to those words
    assert not set(unbiased) <= allowed  # which it was not held to without the bias
    assert "".join(session.answer(prompt, 12, focus=Focus(passages=1))) == plain  # nothing of it stays


def _read_the_quagga_text(session):
    """79 lines of filler with one line about a quagga, read under the built-in ask template; (tokenizer, prompt)."""
    lines = [f"Line {i}: the grass is green and the sky is blue.\n" for i in range(1, 80)]
    lines[20] = "Line 21: the quagga waits at the gate.\n"
    text = "".join(lines)
    tokenizer = session.loaded.tokenizer
    prompt = build_prompt(tokenizer, builtin_template("ask"), "Where does the quagga wait?", None)
    session.read(prompt.prefix, session.tokenize(text), source_map=SourceMap(text, [Piece(text, "n.txt", None, 1)]))
    return tokenizer, prompt


# ---- two answers: the memory's and the re-read passages' alone ---------------------------------------------------


def test_the_passages_answer_alone_from_a_fresh_memory_and_the_more_confident_answer_is_kept(session):
    tokenizer, prompt = _read_the_quagga_text(session)
    memory = "".join(session.answer(prompt, 6, focus=Focus(passages=1)))
    memory_logprobs = list(session.answer_logprobs)
    state = session.engine.checkpoint()

    kept = "".join(session.answer(prompt, 6, focus=Focus(passages=1, alone_margin=-math.inf)))
    assert kept == memory and session.answered_from == "memory" and session.answer_logprobs == memory_logprobs

    alone = "".join(session.answer(prompt, 6, focus=Focus(passages=1, alone_margin=math.inf)))
    assert session.answered_from == "passages"
    # The prompt's opening, the passages and the question, read by a fresh memory with no document before them.
    rendered = render_passages(prompt.question, session.reread_texts)
    ids = list(prompt.prefix) + prompt.with_passages(tokenizer.encode(rendered, add_special_tokens=False))
    first = torch.log_softmax(Engine(session.loaded.model, CFG).feed(ids).float(), -1).max()
    assert session.answer_logprobs[0] == pytest.approx(float(first), abs=1e-5)
    assert session.answer_logprobs[0] != pytest.approx(memory_logprobs[0], abs=1e-5)
    engine = session._alone[0]
    assert "".join(session.answer(prompt, 6, focus=Focus(passages=1, alone_margin=math.inf))) == alone
    assert session._alone[0] is engine  # one engine for the session's answers, its opening read once

    # The document's memory is as the read left it, whichever answer was kept.
    assert [m.store.count for m in session.engine.layers] == [s["blocks"] for s in state]
    assert "".join(session.answer(prompt, 6, focus=Focus(passages=1))) == memory


def test_where_the_second_engine_does_not_fit_the_memory_answer_stands_and_says_why(session):
    from infllm.errors import ResourceError

    _, prompt = _read_the_quagga_text(session)
    memory = "".join(session.answer(prompt, 6, focus=Focus(passages=1)))
    session._alone = None  # as before a session's first second answer (the fixture is shared)
    full = ResourceError("not enough memory for these engine settings")
    with mock.patch("infllm.session.check_engine", side_effect=full):
        kept = "".join(session.answer(prompt, 6, focus=Focus(passages=1, alone_margin=math.inf)))
    assert kept == memory and session.answered_from == "memory"
    assert session.alone_skipped == str(full) and session._alone is None
    "".join(session.answer(prompt, 6, focus=Focus(passages=1, alone_margin=math.inf)))  # room again
    assert session.answered_from == "passages" and session.alone_skipped == ""


def test_an_answer_with_no_text_is_never_the_more_confident():
    from infllm.session import ALONE_MARGIN, Draft

    assert Draft(tokens=[5, 6], text="Yes", logprobs=[-0.5, -1.5]).confidence == -1.0
    assert Draft(text="", logprobs=[-0.01]).confidence == -math.inf  # a stop token at once: sure, and empty
    assert Draft(text=" \n", tokens=[7], logprobs=[-0.01, -0.01]).confidence == -math.inf
    assert answer_focus(3).alone_margin == ALONE_MARGIN and answer_focus(0).alone_margin is None
