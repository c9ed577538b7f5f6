"""``speccascade log-traces``: run drafter and target over a task's data and log trace rows.

``reference`` mode teacher-forces the gold continuation: one batched forward of each model gives
every position's ``q`` and ``p``. ``on-policy`` mode decodes with the speculative cascade under a
rule and logs every drafted position through the decoder's hook, with target-as-oracle labels and
the task's final score. The same command runs as N processes under Lightning Fabric (gloo on the
CPU); process ``r`` of ``N`` takes examples ``r, r + N, ...`` and writes its own shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..decoding import BlockEvent, ModelPair, SpeculativeCascade, load_pair
from ..deferral import features as F
from ..deferral import rules as rules_module
from ..errors import SpeccascadeError
from . import traces
from .schema import position_rows, to_numpy
from .tasks import Example, Task, get_task

MODES = ("reference", "on-policy")
HIDDEN = ("none", "drafter", "target", "both")


def log_traces(
    out: Path,
    models: str | None = "smollm2-135m",
    drafter: str | None = None,
    target: str | None = None,
    task: str = "arithmetic",
    data_file: str | None = None,
    split: str = "train",
    limit: int | None = 64,
    mode: str = "reference",
    rule: str = "always",
    block_size: int = 5,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    max_reference_tokens: int = 256,
    few_shot: int = 0,
    hidden_states: str = "none",
    topk: int = 8,
    batch_size: int = 8,
    shard_examples: int = 32,
    seed: int = 0,
    resume: bool = False,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
) -> dict:
    """Log per-position features and labels of a model pair on a task to sharded parquet traces.

    Args:
        out: output directory (manifest.json + shards/).
        models: model-pair preset; --drafter/--target hub ids or paths replace it.
        drafter: drafter hub id or path (with --target).
        target: target hub id or path.
        task: task name (arithmetic, gsm8k, summarisation, translation, qa).
        data_file: local JSONL/parquet file of the task's records instead of the hub dataset.
        split: data split.
        limit: number of examples (all when null).
        mode: reference (teacher-forced on the gold continuation) or on-policy (speculative cascade).
        rule: on-policy deferral rule, name or name:value (always = exact speculative decoding).
        block_size: drafts per block (gamma); also the virtual block of reference mode's position features.
        temperature: on-policy sampling temperature (0 = greedy).
        max_new_tokens: on-policy new tokens per example.
        max_reference_tokens: reference mode: the gold continuation is cut to this many tokens.
        few_shot: solved examples put in each prompt (tasks that support it).
        hidden_states: also log last-layer hidden states (float16) of none, drafter, target or both.
        topk: also log the top-k token ids and probabilities of both models (0 = off).
        batch_size: examples per forward / decode batch.
        shard_examples: examples per shard (the unit of --resume).
        seed: sampling seed (example i decodes with seed + i) and task-generator seed.
        resume: continue an interrupted run in the same directory.
        devices: processes per node (Lightning Fabric; CPU runs use gloo).
        num_nodes: nodes.
        accelerator: cpu, cuda or auto.
    """
    if mode not in MODES:
        raise SpeccascadeError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if hidden_states not in HIDDEN:
        raise SpeccascadeError(f"hidden_states must be one of {', '.join(HIDDEN)}, got {hidden_states!r}")
    for name, value in (("block_size", block_size), ("batch_size", batch_size), ("shard_examples", shard_examples),
                        ("max_new_tokens", max_new_tokens), ("max_reference_tokens", max_reference_tokens)):
        if value < 1:
            raise SpeccascadeError(f"{name} must be >= 1, got {value}")
    decision_rule = rules_module.parse(rule)
    the_task = get_task(task)
    examples = the_task.examples(split, limit=limit, data_file=data_file, seed=seed, few_shot=few_shot)
    config = {
        "models": None if (drafter or target) else models, "drafter": drafter, "target": target, "task": task,
        "data_file": str(data_file) if data_file else None, "split": split, "limit": limit, "mode": mode,
        "rule": decision_rule.spec if mode == "on-policy" else None, "block_size": block_size,
        "temperature": temperature if mode == "on-policy" else None,
        "max_new_tokens": max_new_tokens if mode == "on-policy" else None,
        "max_reference_tokens": max_reference_tokens if mode == "reference" else None,
        "few_shot": few_shot, "hidden_states": hidden_states, "topk": topk, "seed": seed,
    }
    out = Path(out)
    fabric = _fabric(accelerator, devices, num_nodes)
    problem = None
    if fabric.global_rank == 0:  # one process checks the directory; all stop together if it is unusable
        try:
            traces.prepare(out, config, resume)
        except SpeccascadeError as err:
            problem = str(err)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise SpeccascadeError(problem)
    pair = load_pair(models if not (drafter or target) else None, drafter=drafter, target=target, device=fabric.device)
    header = {
        "config": config,
        "feature_spec": F.spec(),
        "drafter": pair.drafter_id,
        "target": pair.target_id,
        "tokenizer": pair.tokenizer_fingerprint,
        "task": task, "split": split, "mode": mode, "temperature": config["temperature"],
        "block_size": block_size, "seed": seed,
    }
    if fabric.global_rank == 0:
        traces.write_manifest(out, header, complete=False)
    fabric.barrier()
    writer = traces.ShardWriter(out, fabric.global_rank)
    done = writer.completed()
    mine = [(i, ex) for i, ex in enumerate(examples) if i % fabric.world_size == fabric.global_rank and ex.id not in done]
    logger = _Logger(pair, the_task, config, decision_rule)
    bar = tqdm(total=len(mine), unit="ex", desc=f"log-traces rank {fabric.global_rank}" if fabric.world_size > 1 else "log-traces",
               position=fabric.local_rank, disable=None)
    rows, started = 0, time.perf_counter()
    for start in range(0, len(mine), shard_examples):
        chunk = mine[start : start + shard_examples]
        parts = []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            parts.append(logger.rows(batch))
            bar.update(len(batch))
        columns = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        rows += writer.write(columns, [ex.id for _, ex in chunk])
        bar.set_postfix(rows=rows, rows_per_s=f"{rows / (time.perf_counter() - started):.0f}")
    bar.close()
    fabric.barrier()
    manifest = traces.write_manifest(out, header, complete=True) if fabric.global_rank == 0 else {}
    fabric.barrier()
    return manifest


def _fabric(accelerator: str, devices: int, num_nodes: int):
    from lightning_fabric import Fabric

    processes = devices * num_nodes
    strategy = "ddp" if processes > 1 else "auto"
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    return fabric


@dataclass
class _Logger:
    """Turns batches of examples into trace columns for one mode."""

    pair: ModelPair
    task: Task
    config: dict
    rule: rules_module.Rule
    _events: list[BlockEvent] = field(default_factory=list)

    @property
    def hidden(self) -> tuple[str, ...]:
        return {"none": (), "drafter": ("q",), "target": ("p",), "both": ("q", "p")}[self.config["hidden_states"]]

    def rows(self, batch: list[tuple[int, Example]]) -> dict[str, np.ndarray]:
        cols = self._reference(batch) if self.config["mode"] == "reference" else self._on_policy(batch)
        batch_row = cols.pop("_row").tolist()
        return {"example_id": np.array([batch[i][1].id for i in batch_row], dtype=object)} | to_numpy(cols)

    @torch.inference_mode()
    def _reference(self, batch: list[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        """One teacher-forced forward of each model over prompt + gold continuation."""
        pair, cfg = self.pair, self.config
        tok = pair.tokenizer
        prompt_ids, prompt_mask = pair.encode([ex.prompt for _, ex in batch])
        refs = [tok(ex.reference, add_special_tokens=False)["input_ids"][: cfg["max_reference_tokens"]] for _, ex in batch]
        if pair.eos_token_ids:
            refs = [r + [pair.eos_token_ids[0]] for r in refs]
        width = max(len(r) for r in refs)
        ref_ids = torch.full((len(batch), width), pair.pad_token_id, dtype=torch.long)
        ref_mask = torch.zeros_like(ref_ids)
        for b, r in enumerate(refs):  # right-aligned, so every row ends at the last column
            ref_ids[b, width - len(r) :], ref_mask[b, width - len(r) :] = torch.tensor(r), 1
        ref_ids, ref_mask = ref_ids.to(pair.device), ref_mask.to(pair.device)
        outputs = {}
        for name, model in (("q", pair.drafter), ("p", pair.target)):
            logits, hidden, ids = pair.teacher_forced(model, prompt_ids, prompt_mask, ref_ids, ref_mask, name in self.hidden)
            outputs[name] = logits[:, :-1]  # predicts the last `width` tokens
            if name in self.hidden:
                outputs[f"{name}_hidden"] = hidden[:, :-1]
        lengths = torch.tensor([len(r) for r in refs], device=pair.device)
        offset = torch.arange(width, device=pair.device) - (width - lengths).unsqueeze(1)  # index within the continuation
        keep = offset >= 0
        log_q, log_p = (outputs[name][keep].float().log_softmax(-1) for name in ("q", "p"))
        t = offset[keep]
        cols = position_rows(log_q.exp(), log_p.exp(), None, t % cfg["block_size"], cfg["block_size"],
                             reference=ids[:, -width:][keep], topk=cfg["topk"], log_q=log_q, log_p=log_p)
        cols["position"] = t
        cols["_row"] = torch.arange(len(batch), device=pair.device).unsqueeze(1).expand(-1, width)[keep]
        cols["example_index"] = torch.tensor([i for i, _ in batch], device=pair.device)[cols["_row"]]
        for name in self.hidden:
            cols[f"{name}_hidden"] = outputs[f"{name}_hidden"][keep]
        return cols

    def _on_policy(self, batch: list[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        """Decode with the speculative cascade; every drafted position becomes a row."""
        pair, cfg = self.pair, self.config
        gamma = cfg["block_size"]
        blocks: list[dict[str, torch.Tensor]] = []

        def hook(e: BlockEvent) -> None:
            rows, t = torch.nonzero(e.active.unsqueeze(1).expand(-1, gamma), as_tuple=True)
            cols = position_rows(e.q[rows, t], e.p[rows, t], e.drafts[rows, t], t, gamma, topk=cfg["topk"])
            cols["position"] = e.out_index[rows] + t
            cols["deferred"] = e.deferred[rows, t]
            cols["accepted"] = t < e.n_accepted[rows]
            cols["examined"] = t <= e.n_accepted[rows]
            cols["_row"] = rows
            for name in self.hidden:
                cols[f"{name}_hidden"] = getattr(e, f"{name}_hidden")[rows, t]
            blocks.append(cols)

        decoder = SpeculativeCascade(pair, self.rule, block_size=gamma, temperature=cfg["temperature"],
                                     hook=hook, hook_hidden_states=bool(self.hidden))
        ids, mask = pair.encode([ex.prompt for _, ex in batch])
        out = decoder.generate(ids, mask, max_new_tokens=cfg["max_new_tokens"], seed=[cfg["seed"] + i for i, _ in batch])
        texts = pair.decode(out.new_tokens)
        scores = torch.tensor([self.task.score(text, ex) for text, (_, ex) in zip(texts, batch)], device=pair.device)
        lengths = torch.tensor([r["new_tokens"] for r in out.stats.rows], device=pair.device)
        cols = {k: torch.cat([blk[k] for blk in blocks]) for k in blocks[0]}
        keep = cols["position"] < lengths[cols["_row"]]  # drafts past the end of the text are dropped
        cols = {k: v[keep] for k, v in cols.items()}
        cols["score"] = scores[cols["_row"]]
        cols["example_index"] = torch.tensor([i for i, _ in batch], device=pair.device)[cols["_row"]]
        return cols
