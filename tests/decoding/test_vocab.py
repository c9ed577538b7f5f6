"""A drafter whose head scores part of the vocabulary (``load_pair(..., drafter_vocab=TASK)``): its logits are
the full head's on the kept tokens and give the rest no mass, the target is untouched, and speculative
decoding stays exact (greedy token for token; sampled in distribution, even for tokens q cannot propose)."""

from __future__ import annotations

import copy

import pytest
import torch

from speccascade import Autoregressive, SpeculativeCascade, rules
from speccascade.cli import main
from speccascade.data.tasks import TASKS
from speccascade.decoding import load_pair, tiny_random_pair
from speccascade.decoding.vocab import FILL, restrict_vocabulary, task_vocabulary
from speccascade.errors import SpeccascadeError
from tests.conftest import DEVICE
from tests.decoding.test_distribution import GAMMA, PROMPT, V, chi_square_p, empirical_joint, target_joint

KEPT = [0, 2, 5]  # of the small pair's 8 tokens


@pytest.fixture(scope="module")
def pruned():
    return load_pair("tiny-random", drafter_vocab="arithmetic", device=DEVICE)


def test_the_pruned_head_keeps_the_task_tokens_logits_and_gives_the_rest_no_mass(pair, batch, pruned):
    ids, mask = batch
    kept = task_vocabulary(pair.tokenizer, "arithmetic", pair.eos_token_ids)
    assert 10 <= len(kept) < pair.vocab_size // 2 and set(pair.eos_token_ids) <= set(kept)
    assert "arithmetic replies" in pruned.drafter_id
    with torch.no_grad():
        full, cut = pair.drafter(ids, attention_mask=mask).logits, pruned.drafter(ids, attention_mask=mask).logits
        assert torch.allclose(cut[..., kept], full[..., kept], atol=1e-5)
        rest = torch.ones(cut.shape[-1], dtype=torch.bool)
        rest[kept] = False
        assert (cut[..., rest] == FILL).all() and (cut.softmax(-1)[..., rest] == 0).all()
        assert torch.equal(pruned.target(ids, attention_mask=mask).logits, pair.target(ids, attention_mask=mask).logits)


def test_the_pruned_drafter_proposes_task_tokens_only_and_forced_defer_stays_the_target(pair, batch, pruned):
    ids, mask = batch
    kept = set(task_vocabulary(pair.tokenizer, "arithmetic", pair.eos_token_ids))
    drafted = Autoregressive(pruned, "drafter").generate(ids, mask, max_new_tokens=16)
    tokens = {t for b, r in enumerate(drafted.stats.rows) for t in drafted.new_tokens[b, : r["new_tokens"]].tolist()}
    assert tokens <= kept
    target = Autoregressive(pair, "target").generate(ids, mask, max_new_tokens=16).new_tokens
    exact = SpeculativeCascade(pruned, rules.AlwaysDefer(), block_size=4).generate(ids, mask, max_new_tokens=16).new_tokens
    assert torch.equal(exact, target)


def test_forced_defer_with_a_pruned_drafter_emits_the_target_distribution():
    small = tiny_random_pair(seed=5, vocab_size=V, device=DEVICE)
    pruned = copy.copy(small)
    pruned.drafter = restrict_vocabulary(copy.deepcopy(small.drafter), KEPT)
    dec = SpeculativeCascade(pruned, rules.AlwaysDefer(), block_size=GAMMA, temperature=1.0)
    expected = target_joint(small, dec.sampler)
    assert expected[[t for t in range(V) if t not in KEPT]].sum() > 0.2  # the target often wants what q cannot propose
    assert chi_square_p(empirical_joint(dec), expected) > 1e-3


def test_bad_vocabularies_are_refused(tmp_path, capsys):
    with pytest.raises(SpeccascadeError, match=r"token ids in \[0, 8\)"):
        restrict_vocabulary(tiny_random_pair(seed=5, vocab_size=V).drafter, [0, 8])
    assert main(["log-traces", "--out", str(tmp_path / "x"), "--models", "tiny-random", "--drafter-vocab", "poetry"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --drafter-vocab: unknown task 'poetry'; choose one of {', '.join(TASKS)}"
    assert not (tmp_path / "x").exists()
