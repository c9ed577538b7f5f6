"""``speccascade log-traces``: run drafter and target over a task's data and log trace rows.

``reference`` mode teacher-forces the gold continuation: one batched forward of each model gives
every position's ``q`` and ``p``. ``on-policy`` mode decodes with the speculative cascade under a
rule and logs every drafted position through the decoder's hook, with target-as-oracle labels and
the task's final score (a multi-turn prompt, spec-bench's MT-Bench ones, is decoded turn by turn, each
turn's drafts logged); ``--labels outcome`` adds outcome labels (:mod:`.outcome`), computed with the
batch before its shard is written, so they resume like every other column. The same command runs
as N processes under Lightning Fabric (gloo on the CPU); process ``r`` of ``N`` takes examples
``r, r + N, ...`` and writes its own shards. With W&B on, the finished traces are logged as a
``dataset`` artifact by reference (:func:`speccascade.tracking.trace_artifact`).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..data import traces
from ..data.schema import position_rows, to_numpy
from ..data.tasks import Example, Task, get_task
from ..data.tasks.base import conversation
from ..decoding import BlockEvent, ModelPair, SpeculativeCascade
from ..decoding.pairs import left_padded
from ..deferral import features as F
from ..deferral import rules as rules_module
from ..errors import SpeccascadeError
from ..launch import launch
from ..outdir import OutputDir
from ..pairs import check_heads, load_settings_pair
from ..report import say, wrote
from ..settings import (CategorySettings, DecodingSettings, LaunchSettings, OutputSettings, PairSettings, TaskSettings,
                        TrackingSettings, as_config, resolve_groups, seed_setting, setting)
from ..tracking import run_path, start_run, trace_artifact
from ..version import __version__
from .copied_labels import CopiedLabels
from .outcome import OutcomeCost, OutcomeLabeller, sampled_choice

MODES = ("reference", "on-policy")
HIDDEN = ("none", "drafter", "target", "both")
LABELS = ("gap", "outcome")


@dataclass(kw_only=True)
class LogTracesSettings(TrackingSettings, LaunchSettings, DecodingSettings, CategorySettings, TaskSettings, PairSettings,
                        OutputSettings):
    """Settings of ``log-traces`` (the shared groups, then its own)."""

    mode: Literal[MODES] = setting("reference", "reference (teacher-forced on the gold continuation) or on-policy (speculative cascade)")
    rule: str = setting("always", "on-policy deferral rule, name or name:value (always = exact speculative decoding)")
    max_reference_tokens: int = setting(256, "reference mode: the gold continuation is cut to this many tokens", low=1)
    hidden_states: Literal[HIDDEN] = setting("none", "also log last-layer hidden states (float16) of none, drafter, target or both")
    topk: int = setting(8, "also log the top-k token ids and probabilities of both models (0 = off)", low=0)
    labels: Literal[LABELS] = setting("gap", "gap: the mode's own labels (reference: loss and gap against the gold token; "
                                      "on-policy: the target-as-oracle labels); outcome: also, on-policy, whether the draft instead "
                                      "of the target's token (its argmax, or at T > 0 a draw from it) changes the task's answer "
                                      "(outcome_harm; tasks with an exact-match answer)")
    outcome_max_new_tokens: int = setting(128, "outcome labels: the most tokens the target decodes to finish each "
                                          "reply after a swapped token", low=1)
    outcome_batch_size: int | None = setting(None, "outcome labels: continuations the target decodes together (default "
                                             "twice --batch-size); the labels do not depend on it, and on a CPU more rows "
                                             "per step decode faster", low=1)
    outcome_from: str | None = setting(None, "outcome labels: copy them from earlier outcome-labelled traces of the same "
                                       "replies (same pair, task and decoding; e.g. to add hidden states or top-k without "
                                       "paying for the labels again), checked row by row against the drafted and target tokens")
    shard_examples: int = setting(32, "examples per shard (the unit of --resume)", low=1)
    seed: int = seed_setting("sampling seed (example i decodes with seed + i) and task-generator seed")

    def config(self, rule: rules_module.Rule) -> dict:
        """What the rows depend on: a directory written with another config is refused."""
        on_policy = self.mode == "on-policy"
        config = as_config(self, ("drafter", "target", "task", "data_file", "split", "limit", "mode", "block_size",
                                  "few_shot", "hidden_states", "topk", "seed"))
        picked = {"categories": self.categories, "limit_per_category": self.limit_per_category}
        config |= {k: v for k, v in picked.items() if v is not None}  # absent unless given: earlier traces resume
        return config | self.pair_config() | {"rule": rule.spec if on_policy else None,
                         "temperature": self.temperature if on_policy else None,
                         "max_new_tokens": self.max_new_tokens if on_policy else None,
                         "max_reference_tokens": None if on_policy else self.max_reference_tokens} | (
            {"labels": "outcome", "outcome_max_new_tokens": self.outcome_max_new_tokens} if self.outcome else {})

    @property
    def outcome(self) -> bool:
        return self.labels == "outcome"

    def check_labels(self) -> None:
        """Outcome labels need on-policy decoding and a task whose answer is checked (exact match)."""
        if self.outcome_from is not None and not self.outcome:
            raise SpeccascadeError("--outcome-from copies outcome labels: it needs --labels outcome")
        if not self.outcome:
            return
        if self.mode != "on-policy":
            raise SpeccascadeError("--labels outcome needs --mode on-policy (the labels continue the cascade's own replies)")
        task = get_task(self.task)
        if not task.checkable:
            raise SpeccascadeError(f"--labels outcome needs a task with a checkable answer (exact match); task {self.task!r} "
                                   f"is scored by {task.metric}")


@dataclass
class _Plan:
    """Resolved settings: everything checked, nothing loaded or written yet."""

    settings: LogTracesSettings
    task: Task
    examples: list[Example]
    rule: rules_module.Rule
    config: dict
    out: OutputDir
    copied: CopiedLabels | None = None


def log_traces(out, **options) -> dict:
    """Log per-position features and labels of a model pair on a task to sharded parquet traces.

    ``options`` are the fields of :class:`LogTracesSettings` (the command line's flags); returns the manifest.
    """
    return run(resolve(LogTracesSettings(out=out, **options)))


def resolve(settings: LogTracesSettings) -> _Plan:
    """Check every setting, the task's data and the output directory; load no model, write nothing."""
    resolve_groups(settings)
    settings.check_labels()
    rule = rules_module.parse(settings.rule, setting="--rule").build()
    task, examples = settings.examples(settings.seed, settings.by_category if settings.picks else None)
    if settings.mode == "reference":
        check_gold_replies(examples, settings.task)
    config = settings.config(rule)
    copied = CopiedLabels.open(settings.outcome_from, config) if settings.outcome_from is not None else None
    out = OutputDir(settings.out, "log-traces", config, settings.resume, settings.overwrite, progress=("shards/r*.json",),
                    legacy=traces.legacy_marker)
    return _Plan(settings, task, examples, rule, config, out.check(), copied)


def check_gold_replies(examples: list[Example], task: str) -> None:
    """Reference mode teacher-forces one gold reply per example: refuse examples without one, or with later turns
    whose replies have none (spec-bench's qa and MT-Bench prompts), before any model loads."""
    missing = [ex for ex in examples if not ex.reference or ex.followups]
    if missing:
        categories = ", ".join(dict.fromkeys(ex.category for ex in missing if ex.category))
        where = f"; categories {categories}): pick others (--categories) or" if categories else "):"
        raise SpeccascadeError(f"--mode reference teacher-forces a gold reply, but {len(missing)} of the {len(examples)} "
                               f"{task} examples have none or more than one turn (e.g. {missing[0].id!r}{where} "
                               "use --mode on-policy")


def run(plan: _Plan) -> dict:
    """Log the rows of every example not yet in a complete shard; (re)write the manifest."""
    s = plan.settings
    with plan.out.claim():
        if plan.out.previous:  # a resumed run (rank 0 alone: launched processes have none)
            _discard_damaged(plan.out)
        if plan.out.complete:
            say("log-traces", f"{s.out} holds complete traces of these settings; nothing to do")
            return summarise(s.out, traces.read_manifest(s.out))
        fabric = launch(s.accelerator, s.devices, s.num_nodes)
        pair = load_settings_pair(s, device=fabric.device)
        if s.outcome and pair.is_encoder_decoder:
            raise SpeccascadeError(f"--labels outcome needs a decoder-only pair; {pair.name!r} is encoder-decoder")
        if s.topk > pair.vocab_size:
            raise SpeccascadeError(f"--topk {s.topk} is more than the vocabulary of {pair.name!r} ({pair.vocab_size} tokens)")
        check_heads([plan.rule], pair)
        header = {"config": plan.config, "feature_spec": F.spec(), "drafter": pair.drafter_id, "target": pair.target_id,
                  "tokenizer": pair.tokenizer_fingerprint, "vocab_size": pair.vocab_size, "task": s.task, "split": s.split, "mode": s.mode,
                  "temperature": plan.config["temperature"], "block_size": s.block_size, "seed": s.seed,
                  "speccascade_version": __version__}
        computes_labels = s.outcome and plan.copied is None
        labeller = OutcomeLabeller(pair, plan.task, s.outcome_max_new_tokens, s.outcome_batch_size or 2 * s.batch_size,
                                   isinstance(plan.rule, rules_module.AlwaysDefer), s.temperature) if computes_labels else None
        if fabric.global_rank == 0:
            traces.write_manifest(s.out, header, complete=False)
        fabric.barrier()
        _log_examples(plan, fabric, RowLogger(pair, plan.task, plan.config, plan.rule, labeller, plan.copied))
        fabric.barrier()
        manifest = {}
        if fabric.global_rank == 0:
            if plan.copied is not None:  # what the labels cost where they were computed
                header["outcome_labels"] = plan.copied.summary()
            elif s.outcome:  # the cost over every complete shard, this run's and earlier runs' alike
                cost = OutcomeCost.from_dict(traces.shard_stats(s.out))
                header["outcome_labels"] = cost.summary(s.outcome_max_new_tokens)
            manifest = traces.write_manifest(s.out, header, complete=True)
        fabric.barrier()
        plan.out.finish()
    if manifest and s.wandb_mode != "disabled":
        log_artifact(plan)
    return summarise(s.out, manifest) if manifest else manifest


def _discard_damaged(out: OutputDir) -> None:
    """Before a resumed run keeps anything: delete every damaged file (:func:`.traces.damaged_files`), the run
    marked unfinished first, so that the manifest is written again and the examples of a damaged shard logged again."""
    damaged = traces.damaged_files(out.path)
    if damaged:
        out.reopen()
    for path, problem in damaged.items():
        again = "writing it again" if path.name == traces.MANIFEST else "logging its examples again"
        print(f"log-traces: {problem}; {again}", file=sys.stderr, flush=True)
        traces.discard(path)


def summarise(directory: Path, manifest: dict) -> dict:
    """Print what the traces hold (examples, rows, their labels) and where; returns the manifest."""
    outcome = manifest.get("outcome_labels")
    shards, rule = len(manifest["shards"]), manifest["config"].get("rule")
    say("log-traces", f"{manifest['examples']} examples, {manifest['rows']} positions (rows) in {shards} shard"
        f"{'s' if shards != 1 else ''}, {manifest['mode']} mode{f' under {rule}' if rule else ''}; "
        f"{label_summary(directory, manifest)}", *([_cost_line(outcome)] if outcome else []),
        wrote(directory, note="manifest.json, shards/"))
    return manifest


def label_summary(directory: Path, manifest: dict) -> str:
    """The mode's labels in one phrase: reference, the mean gap (loss_q - loss_p) and where the drafter is worse;
    on-policy, the share of drafts accepted and of examined ones deferred."""
    if not manifest["rows"]:
        return "no labels"
    files = [str(Path(directory) / shard["file"]) for shard in manifest["shards"]]
    if manifest["mode"] == "reference":
        gap = _read(files, ["gap"])["gap"].to_numpy()
        return (f"mean gap (loss_q - loss_p) {gap.mean():.4f}, drafter worse than the target at {(gap > 0).mean():.0%} "
                "of positions")
    table = _read(files, ["accepted", "examined", "deferred"])
    accepted, examined, deferred = (table[c].to_numpy() for c in ("accepted", "examined", "deferred"))
    return (f"{accepted.mean():.0%} of drafted positions accepted, {deferred[examined].mean():.0%} of the "
            f"{int(examined.sum())} examined ones deferred")


def _read(files: list[str], columns: list[str]) -> pa.Table:
    return pa.concat_tables(traces.read_parquet(f, columns) for f in files)


def _cost_line(summary: dict) -> str:
    return (f"outcome labels on {summary['labelled_positions']} examined positions, "
            f"{summary['decoded_positions']} decoded (draft != target's choice), {summary['harmful_positions']} harmful, "
            f"{summary['helpful_positions']} helpful; {summary['decoded_positions_where_target_right']} decoded where the "
            "target's choice scores; "
            f"label cost {summary['extra_target_tokens']} extra target tokens = "
            f"{summary['extra_target_tokens_per_labelled_position']:.1f} per labelled position "
            f"({summary['extra_target_tokens_per_decoded_position']:.1f} per decoded one)")


def log_artifact(plan: _Plan) -> None:
    """One W&B run that logs the finished traces as a ``dataset`` artifact by reference (manifest and checksums)."""
    s = plan.settings
    run = start_run(s.out, s.wandb_project, s.wandb_mode, "log-traces", plan.config, s.wandb_group)
    run.log_artifact(trace_artifact(s.out))
    print(f"W&B run: {run_path(run)}")
    run.finish()


def _log_examples(plan: _Plan, fabric, logger: RowLogger) -> int:
    """This process's share of the examples not yet logged, in shards of whole examples; returns the rows written."""
    s = plan.settings
    writer = traces.ShardWriter(s.out, fabric.global_rank)
    done = fabric.broadcast(writer.completed(), src=0)  # every rank splits the same list
    mine = share([(i, ex) for i, ex in enumerate(plan.examples) if ex.id not in done], fabric.global_rank, fabric.world_size)
    bar = tqdm(total=len(mine), unit="ex", desc=f"log-traces rank {fabric.global_rank}" if fabric.world_size > 1 else "log-traces",
               position=fabric.local_rank, disable=None)
    rows, started = 0, time.perf_counter()
    for start in range(0, len(mine), s.shard_examples):
        chunk = mine[start : start + s.shard_examples]
        parts = []
        for b in range(0, len(chunk), s.batch_size):
            batch = chunk[b : b + s.batch_size]
            parts.append(logger.rows(batch))
            bar.update(len(batch))
        columns = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        rows += writer.write(columns, [ex.id for _, ex in chunk], logger.take_stats())
        bar.set_postfix(rows=rows, rows_per_s=f"{rows / (time.perf_counter() - started):.0f}")
    bar.close()
    return rows


def share(todo: list, rank: int, world_size: int) -> list:
    """Process ``rank``'s part of the examples still to log: every ``world_size``-th of them in an order shuffled
    once (seed 0), kept in their own order. A split by index would hand one process every example of a kind where
    kinds take turns (the arithmetic levels cycle with period 4: one of two processes got all the longest); the
    split of what is left also balances a resumed run whose processes had finished unequal parts."""
    order = list(range(len(todo)))
    random.Random(0).shuffle(order)
    return [todo[k] for k in sorted(order[rank::world_size])]


@dataclass
class RowLogger:
    """Turns batches of examples into trace columns for one mode (also timed by benchmarks/trace_logging.py)."""

    pair: ModelPair
    task: Task
    config: dict
    rule: rules_module.Rule
    outcome: OutcomeLabeller | None = None
    copied: CopiedLabels | None = None  # outcome labels taken from earlier traces instead (``--outcome-from``)
    _cost: OutcomeCost = field(default_factory=OutcomeCost)

    def take_stats(self) -> dict[str, int] | None:
        """The outcome labels' cost since the last shard (for its sidecar), then start counting again."""
        if self.outcome is None:
            return None
        stats, self._cost = self._cost.as_dict(), OutcomeCost()
        return stats

    @property
    def hidden(self) -> tuple[str, ...]:
        return {"none": (), "drafter": ("q",), "target": ("p",), "both": ("q", "p")}[self.config["hidden_states"]]

    def rows(self, batch: list[tuple[int, Example]]) -> dict[str, np.ndarray]:
        cols = self._reference(batch) if self.config["mode"] == "reference" else self._on_policy(batch)
        batch_row = cols.pop("_row").tolist()
        ids = {"example_id": np.array([batch[i][1].id for i in batch_row], dtype=object)}
        if any(ex.category for _, ex in batch):  # a task with categories (spec-bench)
            ids["category"] = np.array([batch[i][1].category for i in batch_row], dtype=object)
        return ids | to_numpy(cols)

    @torch.inference_mode()
    def _reference(self, batch: list[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        """One teacher-forced forward of each model over prompt + gold continuation."""
        pair, cfg = self.pair, self.config
        tok = pair.tokenizer
        prompt_ids, prompt_mask = pair.encode([ex.prompt for _, ex in batch])
        refs = [tok(ex.reference, add_special_tokens=False)["input_ids"][: cfg["max_reference_tokens"]] for _, ex in batch]
        if pair.eos_token_ids:
            refs = [r + [pair.eos_token_ids[0]] for r in refs]
        ref_ids, ref_mask = left_padded(refs, pair.pad_token_id, pair.device)  # every row ends at the last column
        width = ref_ids.shape[1]
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
        cols["turn"] = torch.zeros_like(t)  # one teacher-forced reply per example
        cols["_row"] = torch.arange(len(batch), device=pair.device).unsqueeze(1).expand(-1, width)[keep]
        cols["example_index"] = torch.tensor([i for i, _ in batch], device=pair.device)[cols["_row"]]
        for name in self.hidden:
            cols[f"{name}_hidden"] = outputs[f"{name}_hidden"][keep]
        return cols

    def _on_policy(self, batch: list[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        """Decode with the speculative cascade turn by turn; every drafted position becomes a row.

        A later turn of a multi-turn example (spec-bench's MT-Bench prompts) is decoded after the example's own
        replies to the turns before it, as ``evaluate`` decodes it, in a decode of its own: its rows have ``turn``
        1, 2, ... and positions from 0 in its reply, the ``reply_start`` the decoder gives a head there; the
        example's score is its last reply's.
        """
        examples, device = [ex for _, ex in batch], self.pair.device
        seeds = [self.config["seed"] + i for i, _ in batch]
        replies: list[list[str]] = [[] for _ in batch]
        parts = []
        for turn in range(1 + max(len(ex.followups) for ex in examples)):
            rows = [b for b, ex in enumerate(examples) if turn <= len(ex.followups)]
            cols, texts = self._turn([examples[b] for b in rows], [conversation(examples[b], replies[b]) for b in rows],
                                     [seeds[b] for b in rows], turn)
            cols["_row"] = torch.tensor(rows, device=device)[cols["_row"]]
            cols["turn"] = torch.full_like(cols["_row"], turn)
            for b, text in zip(rows, texts):
                replies[b].append(text)
            parts.append(cols)
        cols = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        scores = torch.tensor([self.task.score(texts[-1], ex) for texts, ex in zip(replies, examples)], device=device)
        cols["score"] = scores[cols["_row"]]
        cols["example_index"] = torch.tensor([i for i, _ in batch], device=device)[cols["_row"]]
        return cols

    def _turn(self, examples: list[Example], prompts: list, seeds: list[int],
              turn: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """One decode of ``prompts`` (one per example) with the hook: the drafted positions' columns (``_row`` indexing
        ``examples``, ``position`` the index in this decode's reply; with ``--labels outcome`` the outcome labels,
        copied from the rows of the example's ``turn`` with ``--outcome-from``) and the replies."""
        pair, cfg = self.pair, self.config
        gamma = cfg["block_size"]
        sampled_labels = self.outcome is not None and cfg["temperature"] > 0
        blocks: list[dict[str, torch.Tensor]] = []

        def hook(e: BlockEvent) -> None:
            rows, t = torch.nonzero(e.active.unsqueeze(1).expand(-1, gamma), as_tuple=True)
            cols = position_rows(e.q[rows, t], e.p[rows, t], e.drafts[rows, t], t, gamma, topk=cfg["topk"])
            cols["position"] = e.out_index[rows] + t
            cols["deferred"] = e.deferred[rows, t]
            cols["accepted"] = t < e.n_accepted[rows]
            cols["examined"] = t <= e.n_accepted[rows]
            cols["_row"] = rows
            if sampled_labels:  # the target's choice the outcome label compares with the draft
                cols["_choice"] = sampled_choice(e.p[rows, t], cfg["temperature"], [seeds[r] for r in rows.tolist()],
                                                 cols["position"].tolist())
            for name in self.hidden:
                cols[f"{name}_hidden"] = getattr(e, f"{name}_hidden")[rows, t]
            blocks.append(cols)

        decoder = SpeculativeCascade(pair, self.rule, block_size=gamma, temperature=cfg["temperature"],
                                     hook=hook, hook_hidden_states=bool(self.hidden))
        ids, mask = pair.encode(prompts)
        out = decoder.generate(ids, mask, max_new_tokens=cfg["max_new_tokens"], seed=seeds)
        lengths = torch.tensor([r["new_tokens"] for r in out.stats.rows], device=pair.device)
        cols = {k: torch.cat([blk[k] for blk in blocks]) for k in blocks[0]}
        keep = cols["position"] < lengths[cols["_row"]]  # drafts past the end of the text are dropped
        cols = {k: v[keep] for k, v in cols.items()}
        if self.copied is not None:
            labels = self.copied.label([examples[b].id for b in cols["_row"].tolist()], turn,
                                       *(cols[c].cpu().numpy() for c in ("position", "position_in_block", "draft_token",
                                                                         "target_argmax")))
            cols["outcome_harm"], cols["outcome_delta"] = (torch.from_numpy(v).to(pair.device) for v in labels)
        elif self.outcome is not None:
            prompt_ids = [ids[b][mask[b].bool()].tolist() for b in range(len(examples))]
            replies = [out.new_tokens[b, :n].tolist() for b, n in enumerate(lengths.tolist())]
            choice = cols.pop("_choice", cols["target_argmax"])
            harm, delta, cost = self.outcome.label(examples, prompt_ids, replies, cols["_row"], cols["position"],
                                                   cols["draft_token"], choice, cols["examined"], seeds)
            cols["outcome_harm"], cols["outcome_delta"] = harm, delta
            self._cost += cost
        return cols, pair.decode(out.new_tokens)
