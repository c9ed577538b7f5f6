"""Outcome labels (algorithms.md section 5): does taking the drafter's token instead of the target's change
the task's answer?

At an examined on-policy position ``t`` of a reply ``y`` (greedy decoding), let ``x_t`` be the draft and
``a_t = argmax p_t`` the target's choice. Where they differ, the target continues greedily from
``y_<t x_t`` and from ``y_<t a_t`` (at most ``max_new_tokens`` tokens each; all continuations of a batch
decoded together), the task scores both replies, and

    outcome_delta = score(y_<t a_t ...) - score(y_<t x_t ...)      (what keeping the target's token gains)
    outcome_harm  = 1[outcome_delta > 0]                           (the substitution loses quality)

Where ``x_t = a_t`` both are 0 without decoding. Positions after a block's first rejection were never
examined (their prefix is not part of the reply): NaN. When the replies are the target's own greedy
replies (the cascade under ``always`` at T = 0 decodes exactly those), the continuation that kept
``a_t`` is the reply itself, cut to the same length, and only the draft's continuation is decoded.

Sampled decoding (T > 0) asks the same question of what a deferral would have produced: ``a_t`` is a
draw from the target's sampling distribution ``p~_t``, and both continuations are sampled from the target
at T with the same random numbers (common random numbers: the two replies differ because of the swapped
token, not because of the sampling noise). The draw and the continuations are seeded by the example's
seed and the position only (:func:`coupled_seed`), so a row's labels do not depend on its batch and a
resumed run repeats them. One such sample makes ``outcome_delta`` an unbiased estimate of the expected
score lost by accepting ``x_t`` instead of deferring, and ``outcome_harm`` a Bernoulli draw whose mean,
what a head trained on it predicts, is the probability that the swap loses the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..decoding import ModelPair
from ..decoding.continuations import Cut, continue_cuts
from ..decoding.sampling import Sampler, sample
from ..data.tasks import Example, Task

CHOICE, CONTINUATION = 1, 2  # the two independent uses of a labelled position's randomness


def coupled_seed(seed: int, position: int, use: int) -> int:
    """The seed of one use (:data:`CHOICE`, :data:`CONTINUATION`) of the randomness of the outcome label at
    reply ``position`` of the example decoded with ``seed``, independent of the decode's own streams."""
    return int(np.random.SeedSequence([seed, position, use, 0x0C7C0E]).generate_state(1, np.uint32)[0])


def sampled_choice(p: torch.Tensor, temperature: float, seeds: list[int], positions: list[int]) -> torch.Tensor:
    """``a_t ~ p~_t`` for each row of ``p`` ``[N, V]`` (the target's probabilities at T = 1), drawn with the
    row's :func:`coupled_seed` (greedy: the argmax)."""
    dist = Sampler(temperature)(p.float().clamp_min(1e-30).log())
    u = torch.tensor([torch.rand(1, generator=torch.Generator().manual_seed(coupled_seed(s, t, CHOICE))).item()
                      for s, t in zip(seeds, positions)], device=p.device)
    return sample(dist, u)


@dataclass
class OutcomeCost:
    """What the labels cost and found: positions labelled (examined), decoded (draft != target's choice),
    found harmful (the swap loses quality) or helpful (it gains), decoded where the target's choice scores
    (there a swap can lose the answer but never gain it), and the target's extra work
    (tokens generated, prompt and prefix tokens prefilled)."""

    labelled: int = 0
    decoded: int = 0
    harmful: int = 0
    helpful: int = 0
    target_right: int = 0
    target_tokens: int = 0
    prefill_tokens: int = 0

    def __iadd__(self, other: "OutcomeCost") -> "OutcomeCost":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "OutcomeCost":
        return cls(**{f.name: int(values.get(f.name, 0)) for f in fields(cls)})

    def summary(self, max_new_tokens: int) -> dict:
        """The manifest's ``outcome_labels`` entry."""
        per = lambda n: self.target_tokens / n if n else 0.0  # noqa: E731
        return {"max_new_tokens": max_new_tokens, "labelled_positions": self.labelled, "decoded_positions": self.decoded,
                "harmful_positions": self.harmful, "helpful_positions": self.helpful,
                "decoded_positions_where_target_right": self.target_right, "extra_target_tokens": self.target_tokens,
                "extra_prefill_tokens": self.prefill_tokens,
                "extra_target_tokens_per_labelled_position": per(self.labelled),
                "extra_target_tokens_per_decoded_position": per(self.decoded)}


@dataclass
class OutcomeLabeller:
    """Labels the examined positions of a batch of on-policy replies (see the module docstring)."""

    pair: ModelPair
    task: Task
    max_new_tokens: int
    batch_size: int
    target_replies: bool = False  # the replies are the target's greedy replies: reuse them for the kept choice
    temperature: float = 0.0  # the run's: the continuations are sampled at it, coupled per position

    def __post_init__(self) -> None:
        self.target_replies = self.target_replies and self.temperature == 0  # a sampled reply is not the kept one

    @torch.inference_mode()
    def label(
        self,
        examples: list[Example],
        prompts: list[list[int]],
        replies: list[list[int]],
        row: torch.Tensor,
        position: torch.Tensor,
        draft: torch.Tensor,
        target_choice: torch.Tensor,
        examined: torch.Tensor,
        seeds: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, OutcomeCost]:
        """``outcome_harm`` and ``outcome_delta`` for ``N`` positions (``row`` indexes ``examples``, ``prompts``,
        ``replies``: unpadded token ids, and ``seeds``: the examples' decoding seeds, needed when sampling),
        and what computing them cost."""
        device = row.device
        harm = torch.where(examined, 0.0, float("nan")).to(device)
        delta = harm.clone()
        differs = torch.nonzero(examined & (draft != target_choice)).squeeze(1).tolist()
        rows, pos = row.tolist(), position.tolist()
        # two candidates per differing position: [kept the target's choice, took the draft]
        heads = [(rows[i], pos[i], int(tok[i])) for i in differs for tok in (target_choice, draft)]
        starts = [replies[b][:t] + [tok] for b, t, tok in heads]
        finished = [False] * len(heads)
        if self.target_replies:
            eos = set(self.pair.eos_token_ids)
            for k in range(0, len(heads), 2):
                b, t, _ = heads[k]
                if (replies[b] and replies[b][-1] in eos) or len(replies[b]) >= t + 1 + self.max_new_tokens:
                    starts[k], finished[k] = replies[b][: t + 1 + self.max_new_tokens], True
        coupled = [coupled_seed(seeds[b], t, CONTINUATION) if seeds else 0 for b, t, _ in heads]
        scores, cost = self._score(prompts, replies, heads, starts, finished, [examples[b] for b, _, _ in heads], coupled)
        for k, i in enumerate(differs):
            delta[i] = scores[2 * k] - scores[2 * k + 1]
            harm[i] = float(delta[i] > 0)
        cost.labelled, cost.decoded, cost.harmful = int(examined.sum()), len(differs), int((harm == 1).sum())
        cost.helpful, cost.target_right = int((delta < 0).sum()), sum(scores[2 * k] > 0 for k in range(len(differs)))
        return harm, delta, cost

    def _score(self, prompts: list[list[int]], replies: list[list[int]], heads: list[tuple[int, int, int]],
               starts: list[list[int]], finished: list[bool], examples: list[Example], seeds: list[int]
               ) -> tuple[list[float], OutcomeCost]:
        """The task's score of each reply ``start + the target's continuation`` (greedy, or sampled with the
        start's seed), where head ``(b, t, token)``'s start is ``replies[b][:t] + [token]``; a ``finished`` start,
        or one that ends in an end-of-sequence token, is a whole reply already. Every continuation of a reply
        starts from one run of the target over ``prompt + reply`` (:func:`continue_cuts`)."""
        eos = set(self.pair.eos_token_ids)
        open_ = [j for j, s in enumerate(starts) if not finished[j] and s[-1] not in eos]
        sequences = [prompt + reply for prompt, reply in zip(prompts, replies)]
        cuts = [Cut(heads[j][0], len(prompts[heads[j][0]]) + heads[j][1], heads[j][2]) for j in open_]
        found = continue_cuts(self.pair, sequences, cuts, self.max_new_tokens, self.batch_size, Sampler(self.temperature),
                              [seeds[j] for j in open_])
        full = [list(s) for s in starts]
        for j, tokens in zip(open_, found.tokens):
            full[j] += tokens
        texts = self.pair.decode(full)
        cost = OutcomeCost(target_tokens=found.new_tokens, prefill_tokens=found.prefill_tokens)
        return [self.task.score(text, ex) for text, ex in zip(texts, examples)], cost
