"""The sentences an answer re-reads: splitting text into sentences, ranking them by the question's words with the
document's word statistics, and the session re-reading them instead of whole blocks."""

from __future__ import annotations

import math

import torch

from infllm.citations.lexical import LexicalIndex, words
from infllm.citations.sentences import (LONG_SENTENCE, NEIGHBOUR_SHARE, SENTENCE_BLOCKS, asks_for_number,
                                        best_sentences, holds_number, merge, reread_spans, sentence_scores,
                                        sentences)


def test_sentences_end_at_stops_and_blank_lines_and_keep_their_offsets():
    text = 'He said "go." She went!  Did he?\n\nA new paragraph without a stop\nthat runs on'
    spans = sentences(text, start=100)
    got = [text[s - 100 : e - 100].strip() for s, e in spans]
    assert got == ['He said "go."', "She went!", "Did he?", "A new paragraph without a stop\nthat runs on"]
    assert spans[0][0] == 100 and spans[-1][1] == 100 + len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # nothing between sentences is lost
    assert sentences("   \n\n  ") == []


def test_abbreviations_initials_and_lower_case_continuations_do_not_end_a_sentence():
    text = ("They were married at St. Clement's, in Cheapside. Mr. Darcy said no. J. Smith came, e.g. the "
            "others, at 5 p.m. today. Fig. 2 shows it. It ends.")
    got = [text[s:e].strip() for s, e in sentences(text)]
    assert got == ["They were married at St. Clement's, in Cheapside.", "Mr. Darcy said no.",
                   "J. Smith came, e.g. the others, at 5 p.m. today.", "Fig. 2 shows it.", "It ends."]


def test_a_long_run_without_stops_is_split_at_its_lines():
    code = "".join(f"x{i} = compute({i})\n" for i in range(LONG_SENTENCE))  # 2 words a line, no stop
    spans = sentences(code)
    assert len(spans) == LONG_SENTENCE and code[spans[7][0] : spans[7][1]] == "x7 = compute(7)\n"
    short = "a\nb\nc"  # short runs stay whole, lines and all
    assert sentences(short) == [(0, len(short))]


def test_merge_joins_overlapping_and_touching_spans():
    assert merge([(10, 20), (0, 5), (18, 30), (30, 31), (40, 41)]) == [(0, 5), (10, 31), (40, 41)]


def test_sentences_score_with_the_documents_rare_words_and_come_back_best_last():
    blocks = [words("the cat sat on the mat"), words("the dog sat"), words("a zebra and the cat")] * 4
    index = LexicalIndex(blocks)
    assert index.idf("zebra") > index.idf("the") > 0 == index.idf("unicorn")
    texts = [words("the the the the"), words("a zebra here"), words("")]
    scores = index.score_texts("the zebra", texts)
    avg = sum(map(len, texts)) / 3

    def bm25(text):
        return sum(index.idf(w) * text.count(w) * 2.2 / (text.count(w) + 1.2 * (0.25 + 0.75 * len(text) / avg))
                   for w in ("the", "zebra") if w in text)

    assert torch.allclose(scores, torch.tensor([bm25(t) for t in texts]), atol=1e-6)
    assert int(scores.argmax()) == 1 and math.isclose(float(scores[2]), 0.0)

    text = ("The zebra sleeps. The cat sat on the mat. A dog sat there. Nothing else. "
            "The zebra woke up at noon. The end.")
    chosen = best_sentences(index, "When did the zebra wake?", text, [(0, 40), (30, len(text))], 2)
    chosen = [text[a:b] for a, b in chosen]
    assert chosen == ["The zebra woke up at noon. ", "The zebra sleeps. "]  # the best (shorter) last, not the text's
    index = LexicalIndex(blocks + [words("woke up at noon, the end")])
    chosen = best_sentences(index, "Did the zebra wake up at noon?", text, [(0, 40), (30, len(text))], 2)
    assert [text[a:b] for a, b in chosen] == ["The zebra sleeps. ", "The zebra woke up at noon. "]  # "noon" counts
    together = best_sentences(index, "the zebra woke at noon; the end", text, [(0, len(text))], 2)
    assert [text[a:b] for a, b in together] == ["The zebra woke up at noon. The end."]  # neighbours come as one passage
    assert best_sentences(index, "zebra", text, [], 3) == []


def test_questions_that_ask_for_a_number_are_told_from_others():
    for question in ("How old is Charlotte Lucas?", "On what date did he arrive?", "When was it written?",
                     "Which R version is needed for \\doi{}?", "What is the default value of columns?",
                     "How many blocks are cached?"):
        assert asks_for_number(question), question
    for question in ("Who wrote the letter?", "Which town did she visit?", "What does the option --foo do?"):
        assert not asks_for_number(question), question
    question = words("What happened in 1813 on the first day?")
    assert holds_number(words("It came on Monday, November 18th."), question)
    assert holds_number(words("about twenty-seven years"), question)
    assert not holds_number(words("In 1813, on the first day, it rained."), question)  # only the question's own
    assert not holds_number(words("No number here at all."), question)


def test_a_question_asking_for_a_number_prefers_a_sentence_holding_one():
    blocks = [words("the cat sat on the mat"), words("the dog sat"), words("a zebra and the cat"),
              words("the herd left"), words("old news")] * 4
    index = LexicalIndex(blocks)
    text = "The zebra left the herd at dawn. The old zebra was nine. The cat sat."
    region = [[words(text[s:e]) for s, e in sentences(text)]]

    def best(question):
        return [text[a:b] for a, b in best_sentences(index, question, text, [(0, len(text))], 1)]

    question = "How old was the zebra when it left the herd?"
    assert int(index.score_texts(question, region[0]).argmax()) == 0  # the words alone point at the first
    assert best(question) == ["The old zebra was nine. "]
    assert best("Which old zebra left the herd?") == ["The zebra left the herd at dawn. "]  # no number asked
    assert best("How old was the zebra that left the herd at nine?") == ["The zebra left the herd at dawn. "]
    # Each sentence also gains a share of its neighbours' scores, and only of those in its own region.
    bm25 = index.score_texts("Which herd?", region[0] + region[0])
    scores = sentence_scores(index, "Which herd?", [region[0], region[0]])
    assert float(bm25[1]) == 0 and math.isclose(float(scores[1]), NEIGHBOUR_SHARE * float(bm25[0]), rel_tol=1e-6)
    assert float(bm25[3]) > 0 and float(scores[2]) == 0  # the next region's first sentence is not a neighbour


def test_reread_spans_take_sentences_from_the_best_blocks_and_their_neighbours():
    # Blocks of 20 characters; the sentence on the quokka's smile (characters 86-113) is cut by the boundary of
    # blocks 4 and 5.
    text = "".join(f"Filler line {i:02d} x. " for i in range(4)) + "A quokka sat. The quokka smiled at noon. "
    text += "".join(f"Filler line {i:02d} x. " for i in range(20))
    blocks = [(i * 20, (i + 1) * 20) for i in range(len(text) // 20)]
    index = LexicalIndex.over_spans(text, blocks)
    scores = torch.zeros(len(blocks))
    scores[4] = 1.0  # block 4 holds "The q": its neighbour 5 brings the rest of the sentence
    got = [text[a:b] for a, b in reread_spans(index, "when did the quokka smile", text, blocks, scores, 1)]
    assert got == ["The quokka smiled at noon. "] and text.index("smiled") < 100 < text.index("noon")
    # Only the SENTENCE_BLOCKS best blocks (and neighbours) compete: a sentence far from them is not re-read.
    assert len(blocks) - SENTENCE_BLOCKS - 1 > 5
    scores = torch.arange(len(blocks), dtype=torch.float32)  # the last blocks best, far from blocks 4 and 5
    far = [text[a:b] for a, b in reread_spans(index, "quokka", text, blocks, scores, 1)]
    assert len(far) == 1 and "quokka" not in far[0]
