"""The embedded default corpus: real English text that ships with Python, and noisy web-like text.

`builtin:python-docs` (clean): the pydoc topics (`pydoc_data.topics`, the language reference
sections behind `help("topic")`) followed by one document per standard-library module made of
its docstrings, read from the source with `ast` (nothing is imported). The text is the Python
documentation, © Python Software Foundation, under the PSF License Version 2; its exact
content follows the Python version that runs the pipeline.

`builtin:web-noise` (noisy): documents generated from a fixed seed, of the kinds Rho-1's
selection learns to skip: navigation menus, cookie and copyright boilerplate, markup debris,
mojibake, long numeric tables and keyword spam, with fragments of the clean text mixed in as
web pages have. Same Python version and seed, same documents.

`builtin:long-range` (clean, long dependencies): documents of 2–4k tokens whose later tokens far
context predicts — whole standard-library modules (names defined far above their use),
documentation that quotes its own earlier passages, registers of records recalled after a long
stretch of other text — for measuring and selecting what needs long context.

`builtin:retrieval` (clean, synthetic): documents that make retrieval learnable by a small model —
facts hidden at random depths of clean documentation (an access code, a key's value, an item's
number), then questions that recall them. Lengths spread from about 80 to 2,000 tokens. The phrasings
differ from the probes' templates (evaluation/probes.py), so a model that solves a probe has learnt
to look things up, not the probe's words.

`builtin:short-recall` (clean, synthetic): 40,000 documents of ~50 tokens, each one fact or short list in
`builtin:retrieval`'s phrasings recalled a clause later: where a small model first learns to look back.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import random
import sysconfig
from collections.abc import Callable, Iterator

MIN_DOCUMENT_CHARS = 200
NOISE_DOCUMENTS = 200
NOISE_SEED = 1234
# Test suites, the IDLE GUI and vendored packages are not documentation.
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


@functools.cache
def python_docs() -> tuple[str, ...]:
    """Clean documents: pydoc topics, then stdlib module docstrings in sorted path order."""
    from pydoc_data.topics import topics

    documents = [f"{name}\n\n{topics[name].strip()}" for name in sorted(topics)]
    documents.extend(_stdlib_docstring_documents())
    return tuple(doc for doc in documents if len(doc) >= MIN_DOCUMENT_CHARS)


def _stdlib_modules() -> Iterator[tuple[str, str]]:
    """(module name, path) of the standard library's source files, in sorted path order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            yield os.path.relpath(path, stdlib)[: -len(".py")].replace(os.sep, "."), path


def _stdlib_docstring_documents() -> list[str]:
    documents = []
    for module, path in _stdlib_modules():
        try:
            with open(path, "rb") as file:
                tree = ast.parse(file.read())
        except (SyntaxError, ValueError, OSError):  # a few stdlib files are templates
            continue
        documents.append(_module_document(module, tree))
    return documents


def _module_document(module: str, tree: ast.Module) -> str:
    parts = [f"Module {module}"]
    if docstring := ast.get_docstring(tree):
        parts.append(docstring)
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if docstring := ast.get_docstring(node):
                parts.append(f"{node.name}: {docstring}")
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        doc := ast.get_docstring(member)
                    ):
                        parts.append(f"{node.name}.{member.name}: {doc}")
    return "\n\n".join(parts)


@functools.cache
def web_noise() -> tuple[str, ...]:
    """Noisy web-like documents, reproducible from NOISE_SEED."""
    rng = random.Random(NOISE_SEED)
    words = _vocabulary()
    paragraphs = [p for doc in python_docs()[:200] for p in doc.split("\n\n") if 80 < len(p) < 600]
    makers = [_navigation, _boilerplate, _markup, _mojibake, _numeric_table, _keyword_spam]
    documents = []
    for _ in range(NOISE_DOCUMENTS):
        pieces = [maker(rng, words, paragraphs) for maker in rng.sample(makers, k=rng.randint(2, 4))]
        if rng.random() < 0.5:  # real pages carry some real content between the debris
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(paragraphs))
        documents.append("\n".join(pieces))
    return tuple(documents)


def _vocabulary() -> list[str]:
    words = {w.strip(".,:;()[]'\"`").lower() for doc in python_docs()[:100] for w in doc.split()}
    return sorted(w for w in words if w.isalpha() and 3 <= len(w) <= 12)


_MENU_ITEMS = [
    "Home",
    "About",
    "About Us",
    "Products",
    "Services",
    "Blog",
    "News",
    "Contact",
    "Login",
    "Sign up",
    "Cart (0)",
    "FAQ",
    "Support",
    "Careers",
    "Press",
    "Shop",
    "Deals",
    "My Account",
]
_BOILERPLATE = [
    "We use cookies to improve your experience. By continuing to browse you agree to our use of cookies."
    " Accept | Decline",
    "Copyright © {year} {site}. All rights reserved. Terms of Service | Privacy Policy | Sitemap",
    "Subscribe to our newsletter! Enter your email address to get the latest deals and updates.",
    "Share this: Facebook Twitter Pinterest LinkedIn Email Print",
    "Click here to read more >>> Related posts: {a} | {b} | {c}",
    "Posted by admin on {month} {day}, {year} | {n} comments | Filed under: {a}, {b}",
    "JavaScript is disabled in your browser. Please enable JavaScript to view this page.",
    "Advertisement - Continue reading below",
]
_TAGS = ["div", "span", "a", "li", "td", "p", "ul", "script", "style", "iframe"]


def _navigation(rng: random.Random, words: list[str], paragraphs: list[str]) -> str:
    lines = [" | ".join(rng.sample(_MENU_ITEMS, k=rng.randint(5, 10))) for _ in range(rng.randint(1, 3))]
    crumbs = " > ".join(["Home"] + [rng.choice(words).title() for _ in range(rng.randint(2, 4))])
    return "\n".join(lines + [crumbs])


def _boilerplate(rng: random.Random, words: list[str], paragraphs: list[str]) -> str:
    fields = dict(
        year=rng.randint(1998, 2024),
        site=rng.choice(words).title() + ".com",
        month=rng.choice(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]),
        day=rng.randint(1, 28),
        n=rng.randint(0, 99),
        a=rng.choice(words),
        b=rng.choice(words),
        c=rng.choice(words),
    )
    return "\n".join(rng.choice(_BOILERPLATE).format(**fields) for _ in range(rng.randint(2, 5)))


def _markup(rng: random.Random, words: list[str], paragraphs: list[str]) -> str:
    pieces = []
    for _ in range(rng.randint(10, 40)):
        tag = rng.choice(_TAGS)
        attrs = f' class="col-{rng.randint(1, 12)} {rng.choice(words)}-{rng.randint(0, 999)}"'
        if rng.random() < 0.3:
            attrs += f' style="margin:{rng.randint(0, 20)}px;color:#{rng.randrange(16**6):06x}"'
        inner = rng.choice(["&nbsp;", "&amp;", " ".join(rng.sample(words, k=rng.randint(1, 3))), "", "&raquo;"])
        pieces.append(f"<{tag}{attrs}>{inner}</{tag}>" if rng.random() < 0.8 else f"<{tag}{attrs}>")
    if rng.random() < 0.4:
        pieces.append(
            f"<script>var _gaq=_gaq||[];_gaq.push(['_setAccount','UA-{rng.randint(10**6, 10**7)}-1']);</script>"
        )
    return "".join(pieces)


def _mojibake(rng: random.Random, words: list[str], paragraphs: list[str]) -> str:
    text = rng.choice(paragraphs)
    for plain, fancy in (("'", "\u2019"), (" - ", " \u2014 "), ('"', "\u201c"), ("e ", "\u00e9 ")):
        text = text.replace(plain, fancy)
    garbled = text.encode("utf-8").decode("cp1252", errors="replace")
    cut = rng.randint(0, len(garbled) // 2)
    return garbled[:cut] + "\ufffd" * rng.randint(1, 6) + garbled[cut:]


def _numeric_table(rng: random.Random, words: list[str], paragraphs: list[str]) -> str:
    columns = rng.randint(4, 9)
    rows = [" | ".join(rng.choice(words).upper() for _ in range(columns))]
    for _ in range(rng.randint(10, 60)):
        cells = [
            rng.choice(
                [
                    f"{rng.uniform(-1e4, 1e5):,.2f}",
                    str(rng.randint(0, 10**6)),
                    f"{rng.random():.4f}",
                    f"{rng.randint(1990, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                ]
            )
            for _ in range(columns)
        ]
        rows.append(" | ".join(cells))
    return "\n".join(rows)


def _keyword_spam(rng: random.Random, words: list[str], paragraphs: list[str]) -> str:
    keywords = rng.sample(words, k=rng.randint(3, 6))
    phrases = [f"best {k} {rng.choice(['cheap', 'free', 'online', 'download', '2024', 'review'])}" for k in keywords]
    return "Tags: " + ", ".join(rng.choice(phrases) for _ in range(rng.randint(20, 60)))


LONG_RANGE_SEED = 4321
LONG_RANGE_DOCUMENTS = 120
"""Of each of the three kinds."""


@functools.cache
def long_range() -> tuple[str, ...]:
    """Documents whose later tokens far context predicts, 2–4k tokens each, the three kinds interleaved:
    whole standard-library modules (names defined far above their use), documentation that quotes its own
    earlier passages, and registers of records recalled after a long stretch of other text."""
    rng = random.Random(LONG_RANGE_SEED)
    kinds = [_module_sources(), _self_quoting(rng), _recalled_records(rng)]
    return tuple(document for group in zip(*kinds, strict=False) for document in group)


def _module_sources() -> list[str]:
    """Whole module files of 6–14k characters, in sorted path order."""
    documents = []
    for _, path in _stdlib_modules():
        with open(path, encoding="utf-8", errors="replace") as file:
            source = file.read()
        if 6000 <= len(source) <= 14000:
            documents.append(source)
    return documents[:LONG_RANGE_DOCUMENTS]


def _self_quoting(rng: random.Random) -> list[str]:
    """A documentation text, then three of its earlier sentences quoted word for word."""
    documents = []
    for text in python_docs():
        if not 4000 <= len(text) <= 12000:
            continue
        sentences = [s.strip() + "." for s in text[: len(text) // 2].split(". ") if 60 <= len(s.strip()) <= 300]
        if len(sentences) < 3:
            continue
        quoted = rng.sample(sentences, 3)
        documents.append(text + "\n\nAs this text put it earlier:\n" + "\n".join(f'"{q}"' for q in quoted))
        if len(documents) == LONG_RANGE_DOCUMENTS:
            break
    return documents


def _recalled_records(rng: random.Random) -> list[str]:
    """Twenty records, about 6k characters of documentation, then ten of the records recalled."""
    words = _vocabulary()
    paragraphs = [p for doc in python_docs() for p in doc.split("\n\n") if 200 < len(p) < 1200]
    documents = []
    for _ in range(LONG_RANGE_DOCUMENTS):
        records = {
            f"R-{rng.randint(100, 999)}": (
                f"{rng.choice(words)}-{rng.randint(1, 99)}.example.org",
                rng.randint(1024, 65535),
                rng.choice(words).title(),
            )
            for _ in range(20)
        }
        lines = [
            f"Record {key}: host {host}, port {port}, owner {owner}." for key, (host, port, owner) in records.items()
        ]
        filler = []
        while sum(len(p) for p in filler) < 6000:
            filler.append(rng.choice(paragraphs))
        recalled = [
            f"The port of {key} is {records[key][1]}; its owner is {records[key][2]}."
            for key in rng.sample(sorted(records), 10)
        ]
        documents.append("\n".join(["Registry", *lines, "", *filler, "", "Lookups:", *recalled]))
    return documents


RETRIEVAL_SEED = 2468
RETRIEVAL_DOCUMENTS = 2000
RETRIEVAL_CHARS = (300, 8000)
"""A document's length in characters, log-uniform: ~80 to ~2,000 tokens of the builtin tokenizer."""
RETRIEVAL_CHARS_PER_FACT = 200
"""About one fact per 50 tokens: dense enough that a small model's gradient sees lookups often."""
RETRIEVAL_CHARS_PER_LIST = 200
RETRIEVAL_LIST_ITEMS = (4, 12)
RETRIEVAL_MIN_GAP = 40
"""The shortest distance in characters from a statement to its recall; the longest is the document."""
_VALUE_NAMES = ["code", "number", "key", "pin", "id", "value", "setting", "count"]


_PROBE_WORDS = {"pass", "special", "magic", "box", "boxes", "maintained", "maintains", "var"}
"""Kept out of the facts' names: the probes' own words (evaluation/probes.py)."""


def _retrieval_facts(rng: random.Random, words: list[str], count: int) -> list[tuple[str, str]]:
    """(a statement of a fact, a question about it followed by its answer) × count, in three phrasings, each
    fact's name its own in the document. The names come from a large vocabulary, so recalling one means
    finding where it was stated, not learning it."""
    facts: dict[str, tuple[str, str]] = {}
    while len(facts) < count:
        value = str(rng.randint(10 ** (digits := rng.randint(3, 7)) // 10, 10**digits - 1))
        name = f"{rng.choice(words)} {rng.choice(_VALUE_NAMES)}"
        kind = rng.randrange(3)
        if kind == 0:
            fact = (
                f"The {name} is {value}. Keep it safe: {value} is the {name}. ",
                f"What is the {name}? The {name} is {value}. ",
            )
        elif kind == 1:
            key = f"{rng.choice(words)}-{rng.randint(10, 99)}"
            fact = f"Record: the {name} of {key} is {value}. ", f"Look up {key}. The {name} of {key} is {value}. "
        else:
            fact = f"Note that the {name} is {value}. ", f"Recall the {name}: it is {value}. "
        facts.setdefault(name, fact)
    return list(facts.values())


def _retrieval_lists(
    rng: random.Random, words: list[str], count: int, items_range: tuple[int, int] = RETRIEVAL_LIST_ITEMS
) -> list[tuple[str, str]]:
    """(a labelled list, the same list recalled word for word) × count: most of a recall is predictable only by
    copying, the dense signal that makes a small model learn to look back (induction heads)."""
    labels = rng.sample(words, count)
    lists = []
    for label in labels:
        items = ", ".join(f"{rng.choice(words)} {rng.randint(10, 9999)}" for _ in range(rng.randint(*items_range)))
        lists.append((f"Checklist {label}: {items}. ", f"Checklist {label} again: {items}. "))
    return lists


def _word_boundary(text: str, position: int) -> int:
    return text.rfind(" ", 0, position) + 1


@functools.cache
def retrieval() -> tuple[str, ...]:
    """Clean documentation with facts and lists stated at random depths, each recalled further on, at a
    distance log-uniform from a sentence to the whole document: every row length sees recalls it can
    learn, since a document longer than a row is cut into pieces that cannot see each other."""
    rng = random.Random(RETRIEVAL_SEED)
    words = [word for word in _vocabulary() if word not in _PROBE_WORDS]
    paragraphs = [p for doc in python_docs() for p in doc.split("\n\n") if 100 < len(p) < 1500]
    low, high = map(math.log, RETRIEVAL_CHARS)
    documents = []
    for _ in range(RETRIEVAL_DOCUMENTS):
        length = int(math.exp(rng.uniform(low, high)))
        pairs = _retrieval_facts(rng, words, 1 + length // RETRIEVAL_CHARS_PER_FACT)
        pairs += _retrieval_lists(rng, words, 1 + length // RETRIEVAL_CHARS_PER_LIST)
        filler = []
        while sum(len(p) for p in filler) < length:
            filler.append(rng.choice(paragraphs))
        text = "\n\n".join(filler)[:length]
        inserts = []  # (where in the filler, statement before recall, text)
        for statement, recall in pairs:
            drawn = rng.randrange(len(text) + 1)
            gap = math.exp(rng.uniform(math.log(RETRIEVAL_MIN_GAP), math.log(max(length, RETRIEVAL_MIN_GAP))))
            stated = _word_boundary(text, drawn)
            recalled = max(stated, _word_boundary(text, min(len(text), int(drawn + gap))))
            inserts += [(stated, 0, statement), (recalled, 1, recall)]
        pieces, done = [], 0
        for where, _, insert in sorted(inserts, key=lambda item: item[:2]):
            pieces += [text[done:where], insert]
            done = where
        documents.append("".join([*pieces, text[done:]]))
    return tuple(documents)


SHORT_RECALL_SEED = 1357
SHORT_RECALL_DOCUMENTS = 40000
SHORT_RECALL_LIST_ITEMS = (2, 4)
SHORT_RECALL_BETWEEN_CHARS = 60
"""At most this much clean text between a statement and its recall (cut at a word boundary)."""


@functools.cache
def short_recall() -> tuple[str, ...]:
    """One fact or one short list, then at most a paragraph's opening clause, then its recall: ~20 to ~100
    tokens of the builtin tokenizer, half under ~50. A small model learns to look back in contexts this short
    in a few hundred steps, and in 256-token ones not in thousands (the time grows with the context's square:
    Musat et al., 2025); trained here first, it then carries the skill to longer rows within a few hundred
    steps (docs/context-extension.md)."""
    rng = random.Random(SHORT_RECALL_SEED)
    words = [word for word in _vocabulary() if word not in _PROBE_WORDS]
    paragraphs = [p for doc in python_docs() for p in doc.split("\n\n")]
    paragraphs = [p for p in paragraphs if _word_boundary(p, SHORT_RECALL_BETWEEN_CHARS)]  # an opening clause
    documents = []
    for _ in range(SHORT_RECALL_DOCUMENTS):
        if rng.random() < 0.5:
            [(statement, recall)] = _retrieval_facts(rng, words, 1)
        else:
            [(statement, recall)] = _retrieval_lists(rng, words, 1, SHORT_RECALL_LIST_ITEMS)
        paragraph = rng.choice(paragraphs)
        between = paragraph[: _word_boundary(paragraph, rng.randint(0, SHORT_RECALL_BETWEEN_CHARS))]
        documents.append(statement + between + recall)
    return tuple(documents)


BUILTIN_CORPORA: dict[str, Callable[[], tuple[str, ...]]] = {
    "python-docs": python_docs,
    "web-noise": web_noise,
    "long-range": long_range,
    "retrieval": retrieval,
    "short-recall": short_recall,
}
