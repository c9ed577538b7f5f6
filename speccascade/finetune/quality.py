"""Held-out quality of a fine-tuned model: greedy decoding of a task split, the task's metric with a 95%
bootstrap interval over examples, and, for a drafter with a teacher, the paired difference and the greedy
agreement with the teacher (teacher-forced on the teacher's own greedy replies)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.tasks import get_task
from ..decoding import Autoregressive, ModelPair
from ..uncertainty import mean_interval, paired_difference, ratio_interval, resample_weights


def greedy_replies(pair: ModelPair, which: str, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str):
    """Greedy new tokens (EOS included, padding dropped) of ``pair``'s ``which`` model for each prompt."""
    decoder = Autoregressive(pair, which)
    replies: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        ids, mask = pair.encode(prompts[start : start + batch_size])
        out = decoder.generate(ids, mask, max_new_tokens=max_new_tokens)
        for row in out.new_tokens.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in pair.eos_token_ids), len(row))
            replies.append(row[:cut])
    return replies


@torch.inference_mode()
def agreement_counts(pair: ModelPair, prompts: list[str], replies: list[list[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example: positions where the drafter's argmax equals the target's greedy token, and positions,
    teacher-forced on the target's greedy ``replies``."""
    agree, total = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = replies[start : start + batch_size]
        ids, mask = pair.encode(prompts[start : start + batch_size])
        width = max(1, max(len(r) for r in chunk))
        cont = torch.full((len(chunk), width), pair.pad_token_id, dtype=torch.long, device=pair.device)
        cont_mask = torch.zeros_like(cont)
        for i, r in enumerate(chunk):
            cont[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            cont_mask[i, : len(r)] = 1
        logits, _, _ = pair.teacher_forced(pair.drafter, ids, mask, cont, cont_mask)
        # right-aligned continuations: row i's reply occupies the last len(r) positions before the final one
        for i, r in enumerate(chunk):
            guess = logits[i, width - len(r) : width].argmax(-1).tolist() if r else []
            agree.append(sum(int(g == t) for g, t in zip(guess, r)))
            total.append(len(r))
    return np.asarray(agree, float), np.asarray(total, float)


def heldout_report(pair: ModelPair, task: str, split: str, limit: int, max_new_tokens: int, batch_size: int = 16,
                   data_file: str | None = None, seed: int = 0, teacher: bool = False) -> dict:
    """The drafter's held-out quality (``pair.drafter`` is the fine-tuned model); with ``teacher``, also the
    target's (``pair.target`` is the teacher), their paired difference and the greedy agreement."""
    the_task = get_task(task)
    examples = the_task.examples(split, limit=limit, data_file=data_file, seed=seed)
    prompts = [ex.prompt for ex in examples]
    weights = resample_weights(len(examples), seed=seed)

    def scored(which: str) -> tuple[np.ndarray, list[str], list[list[int]]]:
        who = "teacher" if which == "target" else "model"
        replies = greedy_replies(pair, which, prompts, max_new_tokens, batch_size, f"held-out {split} ({who})")
        texts = pair.tokenizer.batch_decode(replies, skip_special_tokens=True)
        return np.array([the_task.score(t, ex) for t, ex in zip(texts, examples)]), texts, replies

    scores, texts, _ = scored("drafter")
    report = {"split": split, "examples": len(examples), "metric": the_task.metric,
              "quality": mean_interval(scores, weights).as_dict(),
              "records": [{"id": ex.id, "prediction": t, "score": float(s)} for ex, t, s in zip(examples, texts, scores)]}
    if teacher:
        teacher_scores, teacher_texts, teacher_replies = scored("target")
        agree, total = agreement_counts(pair, prompts, teacher_replies, batch_size)
        report |= {"teacher_quality": mean_interval(teacher_scores, weights).as_dict(),
                   "teacher_minus_model": paired_difference(teacher_scores, scores, weights).as_dict(),
                   "greedy_agreement": ratio_interval(agree, total, weights).as_dict()}
        for record, t, s in zip(report["records"], teacher_texts, teacher_scores):
            record |= {"teacher_prediction": t, "teacher_score": float(s)}
    return report
