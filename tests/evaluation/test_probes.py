"""Long-context probes: exact, deterministic construction, and scores equal to an independent
computation (full logits for the log-probability, a real greedy `generate` for exact match)."""

from __future__ import annotations

import pytest
import torch

from slm_pipeline.data.tokenizer import load_tokenizer
from slm_pipeline.evaluation.probes import DEPTHS, TASKS, Probe, ProbeBuilder, probe_lengths, score_probe
from tests.models import load, save_tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:pydoc-bpe-4k")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(save_tiny_llama(tmp_path_factory.mktemp("probe-model"), max_positions=512))


def test_probe_lengths_double_up_to_the_model_maximum():
    assert probe_lengths(512) == [256, 512]
    assert probe_lengths(3000) == [256, 512, 1024, 2048, 3000]
    assert probe_lengths(256) == [256]
    assert probe_lengths(128) == []  # too short for a haystack with four needles


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 512])
def test_probes_have_the_exact_length_and_hide_the_answer_at_the_depth(tokenizer, task, length):
    builder = ProbeBuilder(tokenizer)
    for depth in DEPTHS:
        probe = builder.build(task, length, depth, sample=0)
        assert len(probe.prompt) + len(probe.answer) == length
        assert probe == builder.build(task, length, depth, sample=0)  # deterministic
        value = tokenizer.decode(probe.answer).strip()
        assert value.isdigit() and len(value) == 5
        text = tokenizer.decode(probe.prompt)
        assert value in text  # the answer is in the haystack, not only in the answer
        if task == "passkey":
            # the needle's start, as a fraction of the filler, is within one filler sentence of the depth
            needle = builder.encode(f"The pass key is {value}.")
            start = next(i for i in range(len(probe.prompt)) if probe.prompt[i : i + len(needle)] == needle)
            filler = length - len(probe.answer) - len(builder.encode("What is the pass key? The pass key is"))
            assert abs(start / filler - depth) <= len(builder.filler_sentence) / filler + 0.05
    values = {tokenizer.decode(builder.build(task, length, 0.5, sample=s).answer) for s in range(4)}
    assert len(values) > 1  # each sample hides its own value


def test_multikey_probe_has_distractor_needles_and_variable_tracking_a_chain(tokenizer):
    builder = ProbeBuilder(tokenizer)
    multikey = tokenizer.decode(builder.build("niah_multikey", 512, 0.5, 0).prompt)
    assert multikey.count("One of the special magic numbers for") == 4
    probe = builder.build("variable_tracking", 512, 0.25, 0)
    chain = tokenizer.decode(probe.prompt)
    # VAR A = value. VAR B = VAR A. VAR C = VAR B. VAR D = VAR C. ... the value of VAR D? ... of VAR D is
    assert chain.count("VAR ") == 1 + 2 * 3 + 2
    assert f"= {tokenizer.decode(probe.answer).strip()}." in chain


@pytest.fixture(scope="module")
def passkey_probe(tokenizer) -> Probe:
    return ProbeBuilder(tokenizer).build("passkey", 256, 0.5, sample=0)


@pytest.fixture(scope="module")
def memorised_model(tmp_path_factory, passkey_probe):
    """The tiny model overfit on the passkey probe's answer: greedy decoding of its prompt gives the answer."""
    model = load(save_tiny_llama(tmp_path_factory.mktemp("memorised-model"), max_positions=512)).train()
    ids = torch.tensor([passkey_probe.prompt + passkey_probe.answer])
    count = len(passkey_probe.answer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Adam at 1e-2 makes the answer the argmax within a few steps; at 20 each answer token leads the
    # runner-up by more than one nat, far beyond the numerical noise between generate and one forward.
    for _ in range(20):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=count + 1).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, -count:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def greedy_continuation(model, prompt: list[int], count: int) -> list[int]:
    """What a real greedy `generate` (KV cache, one token at a time) appends to the prompt."""
    prompt_ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = model.generate(
            prompt_ids, max_new_tokens=count, do_sample=False, attention_mask=torch.ones_like(prompt_ids)
        )
    return generated[0, len(prompt) :].tolist()


def with_answer(probe: Probe, answer: list[int]) -> Probe:
    return Probe(probe.task, probe.length, probe.depth, probe.prompt, answer)


def test_answer_logprob_equals_full_logits(model, passkey_probe):
    probe = passkey_probe
    log_prob, _ = score_probe(model, probe, "cpu")
    ids = torch.tensor([probe.prompt + probe.answer])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    expected = torch.log_softmax(logits[len(probe.prompt) - 1 : -1], dim=-1)
    assert log_prob == pytest.approx(float(expected.gather(1, torch.tensor(probe.answer)[:, None]).sum()), abs=1e-4)


def test_exact_match_when_the_model_has_memorised_the_answer(memorised_model, passkey_probe, tokenizer):
    answer = passkey_probe.answer
    assert greedy_continuation(memorised_model, passkey_probe.prompt, len(answer)) == answer
    assert score_probe(memorised_model, passkey_probe, "cpu")[1] is True
    # One wrong token, first or last, and greedy decoding no longer gives the answer.
    vocab = memorised_model.config.vocab_size
    for wrong in ([(answer[0] + 1) % vocab, *answer[1:]], [*answer[:-1], (answer[-1] + 1) % vocab]):
        assert greedy_continuation(memorised_model, passkey_probe.prompt, len(wrong)) != wrong
        assert score_probe(memorised_model, with_answer(passkey_probe, wrong), "cpu")[1] is False


def test_no_exact_match_when_greedy_decoding_gives_something_else(model, passkey_probe):
    """The untrained model does not know the pass key: no match, though it does match its own greedy output."""
    answer = passkey_probe.answer
    own = greedy_continuation(model, passkey_probe.prompt, len(answer))
    assert own != answer
    assert score_probe(model, passkey_probe, "cpu")[1] is False
    assert score_probe(model, with_answer(passkey_probe, own), "cpu")[1] is True
    other = [*own[:-1], (own[-1] + 1) % model.config.vocab_size]
    assert score_probe(model, with_answer(passkey_probe, other), "cpu")[1] is False
