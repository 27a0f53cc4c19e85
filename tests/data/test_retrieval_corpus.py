"""builtin:retrieval: every question has one answer, stated earlier in its own document; the phrasings are
not the probes' own; each document's opening list is recalled word for word at its end."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from slm_pipeline.data.embedded import RETRIEVAL_CHARS, RETRIEVAL_DOCUMENTS, retrieval

QUESTIONS = [  # a question with its answer, as a reader would parse it: (names..., answer)
    r"What is the (\w+ \w+)\? The \1 is (\d+)\.",
    r"Look up ([\w-]+)\. The (\w+ \w+) of \1 is (\d+)\.",
    r"Recall the (\w+ \w+): it is (\d+)\.",
]


def values_stated(body: str, name: str) -> list[tuple[int, str]]:
    """(where, value) of every statement of `name` in any phrasing: `the NAME is N`, `the NAME of KEY is N`."""
    pattern = rf"\b[Tt]he {re.escape(name)} (?:of [\w-]+ )?is (\d+)\."
    return [(match.start(), match.group(1)) for match in re.finditer(pattern, body)]


@pytest.fixture(scope="module")
def documents() -> tuple[str, ...]:
    return retrieval()


def test_every_question_has_one_answer_stated_earlier_in_its_document(documents):
    depths, lengths = [], []
    for document in documents:
        body, questions = document.rsplit("\n\n", 1)
        asked = 0
        for question in QUESTIONS:
            for match in re.finditer(question, questions):
                *_, name, answer = match.groups()
                stated = values_stated(body, name)
                assert {value for _, value in stated} == {answer}, match.group(0)  # stated, and only that value
                depths.append(stated[0][0] / len(body))
                asked += 1
        assert asked == len(re.findall(r"What is the|Look up|Recall the", questions))
        [listed] = re.findall(r"^Checklist: (.+?)\.\n\n", body)
        [recalled] = re.findall(r"The checklist again: (.+?)\.$", questions)
        assert recalled == listed and len(listed.split(", ")) >= 4  # recalled word for word
        lengths.append(len(body))
    assert len(documents) == RETRIEVAL_DOCUMENTS
    # facts at every depth; lengths log-uniform between the bounds: the median near their geometric mean, which
    # the statements and the list lengthen by about half (a uniform draw would put it 2.7× above)
    assert np.histogram(depths, bins=4, range=(0, 1))[0].min() > 0.15 * len(depths)
    low, high = RETRIEVAL_CHARS
    assert 0 < math.log(np.median(lengths) / math.sqrt(low * high)) < 0.6


def test_the_corpus_is_the_same_each_time_it_is_made(documents):
    retrieval.cache_clear()
    assert retrieval() == documents


def test_the_phrasings_are_not_the_probes(documents):
    text = "".join(documents)
    for probe_phrase in ("pass key", "special magic number", "VAR ", "holds the key to box", "is maintained by"):
        assert probe_phrase not in text
