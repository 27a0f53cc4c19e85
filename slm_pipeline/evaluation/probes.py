"""Long-context probes, built offline and deterministically from a tokenizer.

- passkey: a 5-digit number hidden at a depth of filler text ("The grass is green. ...");
- niah_single / niah_multikey (RULER): "One of the special magic numbers for KEY is: N." hidden
  in filler, alone or among three distractor needles with other keys;
- variable_tracking (RULER): a chain `VAR A = 12345.`, `VAR B = VAR A.`, ... spread from the
  depth to the end; the question asks for the value of the chain's last variable.

Each probe is token ids: filler, needle(s) and question are tokenized apart and concatenated,
so the lengths are exact and nothing depends on how a tokenizer merges across the joins. A
probe is scored by one forward pass over prompt + answer: the teacher-forced log-probability
of the answer tokens (a graded signal, even for tiny models) and whether greedy decoding
reproduces the answer. The second needs no generation loop: greedy decoding emits the answer
exactly when, under teacher forcing, every answer token is the argmax at its position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEYS = ["amber", "bridge", "canyon", "falcon", "harbor", "lantern", "meadow", "orchid", "quartz", "willow"]
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASKS = ("passkey", "niah_single", "niah_multikey", "variable_tracking")
CHAIN_HOPS = 4
MULTIKEY_DISTRACTORS = 3


@dataclass(frozen=True)
class Probe:
    task: str
    length: int
    depth: float
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


class ProbeBuilder:
    def __init__(self, tokenizer) -> None:
        self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self.filler_sentence = self.encode(FILLER)

    def filler(self, count: int) -> list[int]:
        repeats = -(-count // len(self.filler_sentence))
        return (self.filler_sentence * repeats)[:count]

    def haystack(self, length: int, needles: list[tuple[float, list[int]]], question: list[int]) -> list[int]:
        """`length` tokens of filler with each needle at its depth (at a filler sentence's end), then the question."""
        budget = length - len(question) - sum(len(n) for _, n in needles)
        if budget < len(self.filler_sentence):
            raise ValueError(f"a probe of {length} tokens has no room for filler")
        filler = self.filler(budget)
        sentence = len(self.filler_sentence)
        cuts = [min(budget, round(depth * budget / sentence) * sentence) for depth, _ in needles]
        ids, previous = [], 0
        for cut, (_, needle) in sorted(zip(cuts, needles, strict=True), key=lambda pair: pair[0]):
            ids += filler[previous:cut] + needle
            previous = cut
        return ids + filler[previous:] + question

    def build(self, task: str, length: int, depth: float, sample: int) -> Probe:
        rng = random.Random(f"{task}/{length}/{depth}/{sample}")
        value = str(rng.randint(10000, 99999))
        answer = self.encode(f" {value}")
        if task == "passkey":
            needle = self.encode(f"The pass key is {value}. Remember it. {value} is the pass key. ")
            question = self.encode("What is the pass key? The pass key is")
            needles = [(depth, needle)]
        elif task in ("niah_single", "niah_multikey"):
            keys = rng.sample(KEYS, 1 + (MULTIKEY_DISTRACTORS if task == "niah_multikey" else 0))
            needles = [(depth, self.encode(f"One of the special magic numbers for {keys[0]} is: {value}. "))]
            for key in keys[1:]:
                other = rng.randint(10000, 99999)
                needles.append((rng.random(), self.encode(f"One of the special magic numbers for {key} is: {other}. ")))
            question = self.encode(f"What is the special magic number for {keys[0]}? The special magic number is")
        elif task == "variable_tracking":
            names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(CHAIN_HOPS)]
            statements = [f"VAR {names[0]} = {value}. "] + [
                f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, CHAIN_HOPS)
            ]
            hop_depths = np.linspace(depth, 1.0, CHAIN_HOPS) if depth < 1.0 else [1.0] * CHAIN_HOPS
            needles = [(float(d), self.encode(s)) for d, s in zip(hop_depths, statements, strict=True)]
            question = self.encode(f"What is the value of VAR {names[-1]}? The value of VAR {names[-1]} is")
        else:
            raise ValueError(f"unknown probe task {task!r}")
        prompt = self.haystack(length - len(answer), needles, question)
        return Probe(task, length, depth, prompt, answer)


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


def run_probes(model, tokenizer, lengths: list[int], samples: int, device, progress=None) -> dict:
    """task → list of cells {length, depth, samples, answer_logprob (mean), exact_match (fraction)}."""
    builder = ProbeBuilder(tokenizer)
    results: dict[str, list[dict]] = {}
    for task in TASKS:
        cells = results.setdefault(task, [])
        for length in lengths:
            for depth in DEPTHS:
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


def probe_count(lengths: list[int], samples: int) -> int:
    return len(TASKS) * len(lengths) * len(DEPTHS) * samples


def probe_summary(results: dict) -> dict:
    """task → mean answer log-probability and exact-match rate over all its cells."""
    return {
        task: {
            "answer_logprob": float(np.mean([c["answer_logprob"] for c in cells])),
            "exact_match": float(np.mean([c["exact_match"] for c in cells])),
        }
        for task, cells in results.items()
    }


def probe_table_lines(results: dict) -> list[str]:
    """Per task, a depth × length table: mean answer log-probability and exact matches."""
    lines = []
    for task, cells in results.items():
        lengths = sorted({c["length"] for c in cells})
        lines.append(f"{task}: answer log-prob (exact-match rate), depth × length")
        lines.append("  depth  " + "".join(f"{length:>16}" for length in lengths))
        for depth in DEPTHS:
            row = {c["length"]: c for c in cells if c["depth"] == depth}
            lines.append(
                f"  {depth:>5.0%}  "
                + "".join(f"{row[n]['answer_logprob']:>9.2f} ({row[n]['exact_match']:.0%})".rjust(16) for n in lengths)
            )
    return lines
