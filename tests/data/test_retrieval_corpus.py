"""builtin:retrieval: every recall has one answer, stated earlier in its own document, at distances from a
sentence to the whole document; the phrasings are not the probes' own; lists are recalled word for word."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from slm_pipeline.data.embedded import RETRIEVAL_CHARS, RETRIEVAL_DOCUMENTS, RETRIEVAL_MIN_GAP, retrieval

QUESTIONS = [  # a question with its answer, as a reader would parse it: (names..., answer)
    r"What is the (\w+ \w+)\? The \1 is (\d+)\.",
    r"Look up ([\w-]+)\. The (\w+ \w+) of \1 is (\d+)\.",
    r"Recall the (\w+ \w+): it is (\d+)\.",
]


def values_stated(document: str, name: str) -> list[tuple[int, str]]:
    """(where, value) of every mention of `name` with a value in any phrasing: `the NAME is N`, `the NAME of
    KEY is N`, `N is the NAME`, `the NAME: it is N` — the statement's and the question's own included."""
    name = re.escape(name)
    pattern = rf"\b[Tt]he {name} (?:of [\w-]+ )?is (\d+)\.|(\d+) is the {name}\.|the {name}: it is (\d+)\."
    return [(match.start(), next(filter(None, match.groups()))) for match in re.finditer(pattern, document)]


@pytest.fixture(scope="module")
def documents() -> tuple[str, ...]:
    return retrieval()


def test_every_recall_has_one_answer_stated_earlier_in_its_document(documents):
    depths, gaps, lengths = [], [], []
    for document in documents:
        asked = 0
        for question in QUESTIONS:
            for match in re.finditer(question, document):
                *_, name, answer = match.groups()
                stated = values_stated(document, name)
                assert {value for _, value in stated} == {answer}, match.group(0)  # one value, wherever it is named
                assert stated[0][0] < match.start() and len(stated) >= 2  # stated before it is asked
                depths.append(stated[0][0] / len(document))
                gaps.append(match.start() - stated[0][0])
                asked += 1
        assert asked == len(re.findall(r"What is the \w+ \w+\? |Look up [\w-]+\. |Recall the \w+ \w+: ", document)) > 0
        lists = dict(re.findall(r"Checklist (\w+): (.+?)\. ", document))
        recalls = re.findall(r"Checklist (\w+) again: (.+?)\. ", document)
        assert sorted(label for label, _ in recalls) == sorted(lists)  # each list recalled once
        for label, items in recalls:
            assert items == lists[label] and len(items.split(", ")) >= 4  # word for word
            assert document.index(f"Checklist {label}: ") < document.index(f"Checklist {label} again: ")
        lengths.append(len(document))
    assert len(documents) == RETRIEVAL_DOCUMENTS
    # facts at every depth; recalls from a sentence away to across the document, a good share within a 256-token
    # row (~1,000 characters) and some past a 1,024-token one; lengths log-uniform: the median near the
    # bounds' geometric mean, which the statements and recalls lengthen (a uniform draw puts it 2.7× above)
    assert np.histogram(depths, bins=4, range=(0, 1))[0].min() > 0.1 * len(depths)
    gaps = np.array(gaps)
    assert gaps.min() >= RETRIEVAL_MIN_GAP / 2 and (gaps < 1000).mean() > 0.4 and (gaps > 4000).mean() > 0.05
    low, high = RETRIEVAL_CHARS
    assert 0 < math.log(np.median(lengths) / math.sqrt(low * high)) < 1.2


def test_the_corpus_is_the_same_each_time_it_is_made(documents):
    retrieval.cache_clear()
    assert retrieval() == documents


def assert_no_probe_phrasing(documents) -> None:
    text = "".join(documents)
    for probe_phrase in ("pass key", "special magic numbers?", "VAR", "holds the key to box", "is maintained by"):
        assert not re.search(rf"\b{probe_phrase}\b", text), probe_phrase  # "bypass key", "pass keyword" are not


def test_the_phrasings_are_not_the_probes(documents):
    assert_no_probe_phrasing(documents)


def test_short_recall_documents_each_recall_one_thing_they_state_within_a_short_row():
    from slm_pipeline.data.embedded import short_recall
    from slm_pipeline.data.tokenizer import load_tokenizer

    documents = short_recall()
    assert len(documents) == 40_000
    short_recall.cache_clear()
    assert short_recall() == documents  # the same each time it is made
    kinds = Counter()
    for document in documents:
        questions = [match for question in QUESTIONS for match in re.finditer(question, document)]
        recalls = re.findall(r"Checklist (\w+) again: (.+?)\. ", document)
        assert len(questions) + len(recalls) == 1, document  # one thing recalled, at the end
        if questions:
            [question] = questions
            *key, name, answer = question.groups()
            assert question.end() == len(document.rstrip()), document
            stated = values_stated(document, name)
            assert {value for _, value in stated} == {answer} and stated[0][0] < question.start(), document
            assert not key or f"the {name} of {key[0]} is {answer}. " in document[: question.start()], document
            assert document.split(" ", 1)[0] in ("The", "Record:", "Note"), document  # stated first
            kinds["fact"] += 1
        else:
            [(label, items)] = recalls
            assert document.startswith(f"Checklist {label}: {items}. "), document  # stated first, word for word
            assert document.endswith(f"Checklist {label} again: {items}. ") and 2 <= len(items.split(", ")) <= 4
            kinds["list"] += 1
    assert kinds["fact"] > 0.4 * len(documents) and kinds["list"] > 0.4 * len(documents)
    # short enough that the job's 128-token warm-up rows hold each whole, with its opening and closing tokens
    lengths = [len(ids) for ids in load_tokenizer("builtin:pydoc-bpe-4k")(list(documents))["input_ids"]]
    assert max(lengths) + 2 <= 128 and np.median(lengths) < 64
    assert_no_probe_phrasing(documents)
