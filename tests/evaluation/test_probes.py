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


def test_score_equals_full_logits_and_exact_match_equals_greedy_generation(model, tokenizer):
    probe = ProbeBuilder(tokenizer).build("passkey", 256, 0.5, sample=0)
    log_prob, matched = score_probe(model, probe, "cpu")
    ids = torch.tensor([probe.prompt + probe.answer])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    expected = torch.log_softmax(logits[len(probe.prompt) - 1 : -1], dim=-1)
    assert log_prob == pytest.approx(float(expected.gather(1, torch.tensor(probe.answer)[:, None]).sum()), abs=1e-4)

    # A probe whose answer is what the model generates greedily must match; change one token and it must not.
    prompt = torch.tensor([probe.prompt])
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(prompt))
    own = generated[0, len(probe.prompt) :].tolist()
    assert matched is False or probe.answer == own
    assert score_probe(model, Probe("passkey", 256, 0.5, probe.prompt, own), "cpu")[1] is True
    other = [*own[:2], (own[2] + 1) % model.config.vocab_size]
    assert score_probe(model, Probe("passkey", 256, 0.5, probe.prompt, other), "cpu")[1] is False
