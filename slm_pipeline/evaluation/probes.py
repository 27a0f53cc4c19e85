"""Long-context probes, built offline and deterministically from a tokenizer: RULER's four
families (Hsieh et al., 2024) and the passkey test.

Retrieval
- passkey: a 5-digit number hidden at a depth of filler text ("The grass is green. ...");
- niah_single / niah_multikey: "One of the special magic numbers for KEY is: N." hidden in
  filler, alone or among three distractor needles with other keys.
Multi-hop tracing
- variable_tracking: a chain `VAR A = 12345.`, `VAR B = VAR A.`, ... spread from the depth to
  the end; the question asks for the value of the chain's last variable;
- key_chain: boxes whose keys open other boxes, `Box amber holds the key to box falcon.`, the
  links scattered in no order among two distractor chains; the question asks for the number at
  the end of the chain that starts at the depth.
Aggregation (no depth: the answer is spread over the whole context)
- common_words: a list of made-up words in which three recur many times and the rest once or
  twice; the answer is the three, in the order they first appear;
- frequent_words: made-up words drawn from a Zipf distribution; the answer is the three most
  frequent, most frequent first.
Question answering
- qa: numbered documents from the clean corpus (builtin:python-docs); one of them, at the depth,
  tells who maintains a (made-up) module, and two distractor documents name other modules'
  maintainers; the question asks for the first module's maintainer.

Each probe is token ids: context, needle(s) and question are tokenized apart and concatenated,
so the lengths are exact and nothing depends on how a tokenizer merges across the joins. A
probe is scored by one forward pass over prompt + answer: the teacher-forced log-probability
of the answer tokens (a graded signal, even for tiny models) and whether greedy decoding
reproduces the answer. The second needs no generation loop: greedy decoding emits the answer
exactly when, under teacher forcing, every answer token is the argmax at its position.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEYS = ["amber", "bridge", "canyon", "falcon", "harbor", "lantern", "meadow", "orchid", "quartz", "willow"]
NAMES = ["Ada Park", "Bruno Silva", "Chen Wei", "Dara Okafor", "Elena Rossi", "Farid Haddad", "Greta Lind",
         "Hugo Moreau", "Ines Duarte", "Jonas Berg", "Kira Tanaka", "Luca Bianchi"]  # fmt: skip
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FAMILIES = {
    "retrieval": ("passkey", "niah_single", "niah_multikey"),
    "multi-hop": ("variable_tracking", "key_chain"),
    "aggregation": ("common_words", "frequent_words"),
    "qa": ("qa",),
}
TASKS = tuple(task for tasks in FAMILIES.values() for task in tasks)
DEPTHLESS = frozenset(FAMILIES["aggregation"])
"""Tasks whose answer is spread over the whole context: one cell per length, its depth None."""
CHAIN_HOPS = 4
KEY_CHAIN_HOPS = 3
KEY_CHAIN_DISTRACTORS = 2
MULTIKEY_DISTRACTORS = 3
QA_DISTRACTORS = 2
AGGREGATE = 3
"""Words an aggregation answer lists."""


@dataclass(frozen=True)
class Probe:
    task: str
    length: int
    depth: float | None
    prompt: list[int]
    answer: list[int]


SHORTEST_PROBE = 256
"""Tokens; below this a haystack with four needles has no room for filler."""


def probe_lengths(max_positions: int) -> list[int]:
    """256, 512, ... up to the model's maximum (which is included); none below 256."""
    lengths = []
    length = SHORTEST_PROBE
    while length < max_positions:
        lengths.append(length)
        length *= 2
    return [*lengths, max_positions] if max_positions >= SHORTEST_PROBE else []


def task_depths(task: str) -> tuple[float | None, ...]:
    return (None,) if task in DEPTHLESS else DEPTHS


def made_up_word(rng: random.Random) -> str:
    """A pronounceable non-word ("tavokel"): no prior knowledge tells a model which ones a context holds."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def distinct_words(rng: random.Random, count: int) -> list[str]:
    words: dict[str, None] = {}
    while len(words) < count:
        words[made_up_word(rng)] = None
    return list(words)


@functools.cache
def _clean_paragraphs() -> tuple[str, ...]:
    from slm_pipeline.data.embedded import python_docs

    return tuple(p for doc in python_docs() for p in doc.split("\n\n") if 200 < len(p) < 800)


class ProbeBuilder:
    def __init__(self, tokenizer) -> None:
        self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self.filler_sentence = self.encode(FILLER)

    def filler(self, count: int) -> list[int]:
        repeats = -(-count // len(self.filler_sentence))
        return (self.filler_sentence * repeats)[:count]

    def haystack(
        self,
        length: int,
        needles: list[tuple[float, list[int]]],
        question: list[int],
        pieces: list[list[int]] | None = None,
    ) -> list[int]:
        """`length` tokens of filler (`pieces`, by default the filler sentence repeated) with each needle
        at its depth, between two pieces, then the question."""
        budget = length - len(question) - sum(len(n) for _, n in needles)
        if budget < len(self.filler_sentence):
            raise ValueError(f"a probe of {length} tokens has no room for filler")
        if pieces is None:
            pieces = [self.filler_sentence] * -(-budget // len(self.filler_sentence))
        filler = [t for piece in pieces for t in piece][:budget]
        boundaries = np.minimum(np.cumsum([0] + [len(piece) for piece in pieces]), budget)
        cuts = [int(boundaries[np.abs(boundaries - depth * budget).argmin()]) for depth, _ in needles]
        ids, previous = [], 0
        for cut, (_, needle) in sorted(zip(cuts, needles, strict=True), key=lambda pair: pair[0]):
            ids += filler[previous:cut] + needle
            previous = cut
        return ids + filler[previous:] + question

    def build(self, task: str, length: int, depth: float | None, sample: int) -> Probe:
        if task not in TASKS:
            raise ValueError(f"unknown probe task {task!r}")
        rng = random.Random(f"{task}/{length}/{depth}/{sample}")
        if task in DEPTHLESS:
            prompt, answer = self._listing(rng, length, getattr(self, task))
        else:
            value = str(rng.randint(10000, 99999))
            needles, question, *answer_and_pieces = getattr(self, task)(rng, depth, value)
            answer_text, pieces = answer_and_pieces or (f" {value}", None)
            answer = self.encode(answer_text)
            prompt = self.haystack(length - len(answer), needles, self.encode(question), pieces and pieces(length))
        return Probe(task, length, depth, prompt, answer)

    def passkey(self, rng: random.Random, depth: float, value: str):
        needle = self.encode(f"The pass key is {value}. Remember it. {value} is the pass key. ")
        return [(depth, needle)], "What is the pass key? The pass key is"

    def niah_single(self, rng: random.Random, depth: float, value: str, distractors: int = 0):
        keys = rng.sample(KEYS, 1 + distractors)
        needles = [(depth, self.encode(f"One of the special magic numbers for {keys[0]} is: {value}. "))]
        for key in keys[1:]:
            other = rng.randint(10000, 99999)
            needles.append((rng.random(), self.encode(f"One of the special magic numbers for {key} is: {other}. ")))
        return needles, f"What is the special magic number for {keys[0]}? The special magic number is"

    def niah_multikey(self, rng: random.Random, depth: float, value: str):
        return self.niah_single(rng, depth, value, distractors=MULTIKEY_DISTRACTORS)

    def variable_tracking(self, rng: random.Random, depth: float, value: str):
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(CHAIN_HOPS)]
        statements = [f"VAR {names[0]} = {value}. "] + [
            f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, CHAIN_HOPS)
        ]
        hop_depths = np.linspace(depth, 1.0, CHAIN_HOPS) if depth < 1.0 else [1.0] * CHAIN_HOPS
        needles = [(float(d), self.encode(s)) for d, s in zip(hop_depths, statements, strict=True)]
        return needles, f"What is the value of VAR {names[-1]}? The value of VAR {names[-1]} is"

    def key_chain(self, rng: random.Random, depth: float, value: str):
        """The chain's first link at the depth; its other links and two distractor chains anywhere, in no order."""
        boxes = rng.sample(KEYS, KEY_CHAIN_HOPS * (1 + KEY_CHAIN_DISTRACTORS))
        chains = [boxes[i : i + KEY_CHAIN_HOPS] for i in range(0, len(boxes), KEY_CHAIN_HOPS)]
        numbers = [value] + [rng.randint(10000, 99999) for _ in chains[1:]]
        needles = []
        for index, (chain, number) in enumerate(zip(chains, numbers, strict=True)):
            links = [f"Box {a} holds the key to box {b}. " for a, b in itertools.pairwise(chain)]
            links.append(f"Box {chain[-1]} holds the number {number}. ")
            depths = [depth if index == 0 else rng.random()] + [rng.random() for _ in links[1:]]
            needles += [(d, self.encode(link)) for d, link in zip(depths, links, strict=True)]
        start = chains[0][0]
        return (
            needles,
            f"Start at box {start} and follow the keys: what number does the last box hold? It holds the number",
        )

    def qa(self, rng: random.Random, depth: float, value: str):
        """Documents of clean text as the filler; the answer's document at the depth, two distractors elsewhere."""
        modules = distinct_words(rng, 1 + QA_DISTRACTORS)
        names = rng.sample(NAMES, len(modules))
        facts = [f"Document: the {m} module is maintained by {n}.\n\n" for m, n in zip(modules, names, strict=True)]
        needles = [(depth, self.encode(facts[0]))] + [(rng.random(), self.encode(f)) for f in facts[1:]]
        question = f"Question: who maintains the {modules[0]} module? Answer: the {modules[0]} module is maintained by"

        def documents(length: int) -> list[list[int]]:
            pieces: list[list[int]] = []
            while sum(map(len, pieces)) < length:
                pieces.append(self.encode(f"Document: {rng.choice(_clean_paragraphs())}\n\n"))
            return pieces

        return needles, question, f" {names[0]}", documents

    # Aggregation: the context is a list of words, after enough filler to make the length exact.

    def _listing(self, rng: random.Random, length: int, make) -> tuple[list[int], list[int]]:
        """The longest list `make(rng, count)` gives that fits in `length`, each word tokenized apart."""
        state, count = rng.getstate(), (length - 48) // 3
        while True:
            rng.setstate(state)
            words, question, answer = make(rng, count)
            answer_ids = self.encode(" " + " ".join(answer))
            listed = [token for word in words for token in self.encode(f" {word}")]
            listing = self.encode("Words:") + listed + self.encode(".\n")
            room = length - len(answer_ids) - len(listing) - len(question_ids := self.encode(question))
            if room >= 0:
                return self.filler(room) + listing + question_ids, answer_ids
            count -= max(1, -room // 3)
            if count < 4 * AGGREGATE:
                raise ValueError(f"a probe of {length} tokens has no room for a word list")

    @staticmethod
    def common_words(rng: random.Random, count: int) -> tuple[list[str], str, list[str]]:
        common = distinct_words(rng, AGGREGATE)
        repeats = max(3, count // 8)
        rare = [w for w in dict.fromkeys(made_up_word(rng) for _ in range(count)) if w not in common]
        words = common * repeats + rare[: max(0, count - AGGREGATE * repeats)]
        rng.shuffle(words)
        question = f" What are the {AGGREGATE} most common words in the list, in the order they first appear? They are"
        return words, question, sorted(common, key=words.index)

    @staticmethod
    def frequent_words(rng: random.Random, count: int) -> tuple[list[str], str, list[str]]:
        vocabulary = list(dict.fromkeys(made_up_word(rng) for _ in range(count)))
        zipf = np.cumsum(1.0 / np.arange(1, len(vocabulary) + 1))  # the r-th word drawn ∝ 1/r
        words = [vocabulary[i] for i in np.searchsorted(zipf / zipf[-1], [rng.random() for _ in range(count)])]
        # The answer must be unambiguous: the top three get 3, 2 and 1 more, strictly ahead of what follows.
        top = [w for w, _ in Counter(words).most_common(AGGREGATE)]
        words += [w for rank, w in enumerate(top) for _ in range(AGGREGATE - rank)]
        rng.shuffle(words)
        question = f" What are the {AGGREGATE} most frequent words in the list, most frequent first? They are"
        return words, question, [w for w, _ in Counter(words).most_common(AGGREGATE)]


def score_probe(model, probe: Probe, device) -> tuple[float, bool]:
    """(teacher-forced log-probability of the answer, whether greedy decoding gives the answer)."""
    import torch

    ids = torch.tensor([probe.prompt + probe.answer], device=device)
    answer = torch.tensor(probe.answer, device=device)
    count = len(probe.answer)
    with torch.no_grad():
        # One document, no packing: the default causal mask is right; only the last count+1 logits are made.
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=count + 1).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    answer_log_prob = float(log_probs.gather(1, answer[:, None]).sum())
    greedy_matches = bool((logits.argmax(dim=-1) == answer).all())
    return answer_log_prob, greedy_matches


def run_probes(model, tokenizer, lengths: list[int], samples: int, device, progress=None, tasks=TASKS) -> dict:
    """task → list of cells {length, depth, samples, answer_logprob (mean), exact_match (fraction)}."""
    builder = ProbeBuilder(tokenizer)
    results: dict[str, list[dict]] = {}
    for task in tasks:
        cells = results.setdefault(task, [])
        for length in lengths:
            for depth in task_depths(task):
                scores = [score_probe(model, builder.build(task, length, depth, s), device) for s in range(samples)]
                cells.append(
                    {
                        "length": length,
                        "depth": depth,
                        "samples": samples,
                        "answer_logprob": float(np.mean([lp for lp, _ in scores])),
                        "exact_match": float(np.mean([match for _, match in scores])),
                    }
                )
                if progress is not None:
                    progress.update(samples)
    return results


def probe_count(lengths: list[int], samples: int, tasks=TASKS) -> int:
    return sum(len(task_depths(task)) for task in tasks) * len(lengths) * samples


def probe_summary(results: dict) -> dict:
    """task → mean answer log-probability and exact-match rate over all its cells, and the same by length."""
    summary = {}
    for task, cells in results.items():
        lengths = sorted({c["length"] for c in cells})
        summary[task] = {
            "answer_logprob": float(np.mean([c["answer_logprob"] for c in cells])),
            "exact_match": float(np.mean([c["exact_match"] for c in cells])),
            "by_length": {
                length: {
                    key: float(np.mean([c[key] for c in cells if c["length"] == length]))
                    for key in ("answer_logprob", "exact_match")
                }
                for length in lengths
            },
        }
    return summary


def depth_length_grid(cells: list[dict], key: str = "exact_match") -> tuple[list[float], list[int], np.ndarray]:
    """(depths, lengths, values[depth, length]) of one task's cells: the lost-in-the-middle view."""
    depths = sorted({c["depth"] for c in cells})
    lengths = sorted({c["length"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c[key]
    return depths, lengths, grid


def probe_table_lines(results: dict) -> list[str]:
    """Per task, a depth × length table: mean answer log-probability and exact matches."""
    lines = []
    for task, cells in results.items():
        depths, lengths, logprobs = depth_length_grid(cells, "answer_logprob")
        matches = depth_length_grid(cells, "exact_match")[2]
        lines.append(f"{task}: answer log-prob (exact-match rate), depth × length")
        lines.append("  depth  " + "".join(f"{length:>16}" for length in lengths))
        for row, depth in enumerate(depths):
            label = "–" if depth is None else f"{depth:.0%}"
            lines.append(
                f"  {label:>5}  "
                + "".join(
                    f"{lp:>9.2f} ({em:.0%})".rjust(16) for lp, em in zip(logprobs[row], matches[row], strict=True)
                )
            )
    return lines
