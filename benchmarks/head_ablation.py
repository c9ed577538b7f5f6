"""Which levers move a learned head on held-out traces? One run, one judge, 95% intervals.

Trains heads on reference traces of a train split and judges all of them, with every fixed and
training-free rule and the oracle, on reference traces of a held-out split
(``speccascade.evaluation.offline``: deferral rate that closes 90% of the drafter->target gap,
bootstrap over examples). Two kinds of rows:

- ``train-deferral`` rows: the product's trainer with one setting changed from the default
  (objective, features, hidden-state head, width/depth, training length, amount of data);
- scikit-learn rows, for inputs the heads do not take (top-k probabilities of both models,
  absolute position, the drafted and target tokens' classes, the previous position's features,
  log-probabilities) and for a gradient-boosted teacher and its distillation into an MLP.

    python benchmarks/head_ablation.py --train runs/traces/gsm8k-train --test runs/traces/gsm8k-test \\
        --out runs/ablation --examples 500,2000,7473
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from speccascade.data import traces
from speccascade.deferral import features as F
from speccascade.evaluation import offline
from speccascade.evaluation.compare import check_held_out
from speccascade.deferral import rules as R
from speccascade.training import train_deferral
from speccascade.training.data import in_validation

V1 = ("q_top1", "q_top2", "q_top3", "p_top1", "p_top2", "p_top3", "q_margin", "p_margin", "q_entropy", "p_entropy",
      "tv", "kl_pq", "kl_qp", "argmax_agree", "rel_position")  # feature spec v1
PRODUCT = {  # label -> train-deferral settings that differ from its defaults
    "default (mlp, gap, early stopping)": {},
    "objective classification": {"objective": "classification"},
    "objective relaxed (alpha 0)": {"objective": "relaxed"},
    "features: spec v1 (15)": {"features": list(V1)},
    "hidden-mlp (+ both hidden states)": {"head": "hidden-mlp"},
    "wider and deeper (256 x 3)": {"hidden": 256, "depth": 3},
    "short training (3 epochs, no early stopping)": {"epochs": 3, "patience": None},
    "logistic": {"head": "logistic"},
}


def subset(directory: Path, examples: int, out: Path) -> Path:
    """A trace directory of the first shards that hold ``examples`` examples (links, no copies)."""
    manifest = traces.read_manifest(directory)
    (out / traces.SHARDS).mkdir(parents=True, exist_ok=True)
    held = 0
    for shard in manifest["shards"]:
        if held >= examples:
            break
        for suffix in (".parquet", ".json"):
            source = (directory / shard["file"]).with_suffix(suffix)
            link = out / traces.SHARDS / source.name
            if not link.exists():
                link.symlink_to(source.resolve())
        held += shard["examples"]
    header = {k: v for k, v in manifest.items() if k not in ("complete", "rows", "examples", "shards", "fingerprint", "schema_version")}
    traces.write_manifest(out, header, complete=True)
    return out


def columns_of(directory: Path, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rows = traces.load_traces(directory)
    names = [n for n in names if n in rows.column_names]
    table = rows.select_columns(names + ["example_id"]).with_format("numpy")[:]
    return {n: np.asarray(table[n]) for n in names}, np.asarray(table["example_id"])


def research_inputs(c: dict[str, np.ndarray], example_ids: np.ndarray, vocab_classes: np.ndarray | None) -> dict[str, np.ndarray]:
    """Input matrices for the scikit-learn rows (rows of one example are consecutive in traces)."""
    base = np.stack([c[f] for f in F.POSITION_FEATURES], 1).astype(np.float32)
    probability = [i for i, f in enumerate(F.POSITION_FEATURES) if f not in ("q_entropy", "p_entropy", "kl_pq", "kl_qp", "js", "rel_position")]
    logged = base.copy()
    logged[:, probability] = np.log(np.clip(logged[:, probability], 1e-6, None))
    same = np.r_[False, example_ids[1:] == example_ids[:-1]]
    previous = np.stack([np.where(same, np.roll(c[f], 1), 0.0) for f in ("tv", "argmax_agree", "p_top1")] + [same], 1)
    out = {"spec v2": base, "spec v2, log-probabilities": logged,
           "spec v2 + absolute position": np.c_[base, np.log1p(c["position"])],
           "spec v2 + previous position (tv, agreement, max p)": np.c_[base, previous]}
    if "q_topk_probs" in c:
        out["spec v2 + top-k probabilities of q and p"] = np.c_[base, c["q_topk_probs"], c["p_topk_probs"]]
    if vocab_classes is not None:
        out["spec v2 + token classes (digit, operator, space)"] = np.c_[base, vocab_classes[c["draft_token"]], vocab_classes[c["target_argmax"]]]
    return {k: v.astype(np.float32) for k, v in out.items()}


def token_identity(train: dict[str, np.ndarray], train_ids: np.ndarray, test: dict[str, np.ndarray], fit: np.ndarray,
                   folds: int = 5, prior: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Token identity as inputs: for the drafted and the target's token, the mean gap of the rows that hold that
    token (shrunk towards the overall mean with ``prior`` pseudo-rows) and its log frequency. Train rows get the
    statistics of the other folds of examples (out of fold, so no row sees its own label); test rows those of
    every fitting row."""
    vocab = int(max(train["draft_token"].max(), train["target_argmax"].max(), test["draft_token"].max(),
                    test["target_argmax"].max())) + 1
    fold = np.array([hash_fold(e, folds) for e in train_ids])

    def table(rows: np.ndarray, column: str) -> tuple[np.ndarray, np.ndarray]:
        tokens, gap = train[column][rows], train["gap"][rows]
        count = np.bincount(tokens, minlength=vocab)
        mean = (np.bincount(tokens, weights=gap, minlength=vocab) + prior * gap.mean()) / (count + prior)
        return mean, np.log1p(count)

    def inputs(cols: dict[str, np.ndarray], tables: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return np.stack([t[i][cols[c]] for c, t in tables.items() for i in (0, 1)], 1)

    columns = ("draft_token", "target_argmax")
    train_x = np.zeros((len(train_ids), 2 * len(columns)), dtype=np.float32)
    for k in range(folds):
        others = fit & (fold != k)
        mine = fold == k
        train_x[mine] = inputs({c: train[c][mine] for c in columns}, {c: table(others, c) for c in columns})
    test_x = inputs(test, {c: table(fit, c) for c in columns})
    return train_x, test_x


def hash_fold(example_id: str, folds: int) -> int:
    return int(hashlib.sha256(f"fold:{example_id}".encode()).hexdigest()[:8], 16) % folds


def token_classes(tokenizer) -> np.ndarray:
    """Per vocabulary entry: has a digit, is an operator, starts with a space."""
    text = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    return np.array([[any(ch.isdigit() for ch in t), t.strip() in set("+-*/=<>x%$") and t.strip() != "", t.startswith(" ")]
                     for t in text], dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--examples", default="", help="train-example counts for the data rows (comma-separated)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory, for the token-class row")
    parser.add_argument("--rows", default="product,sklearn", help="row groups: product (train-deferral), sklearn")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    heads: dict[str, R.Learned] = {}
    groups = set(args.rows.split(","))
    for label, settings in PRODUCT.items() if "product" in groups else ():
        slug = "".join(ch if ch.isalnum() else "-" for ch in label)[:40]
        head = train_deferral([str(args.train)], args.out / "heads" / slug, wandb_mode="disabled", overwrite=True, **settings)
        heads[label] = R.Learned(head, 0.0)
        print(f"[{time.perf_counter() - started:.0f}s] trained {label}", flush=True)
    for n in [int(x) for x in args.examples.split(",") if x]:
        part = subset(args.train, n, args.out / "subsets" / f"train-{n}")
        head = train_deferral([str(part)], args.out / "heads" / f"data-{n}", wandb_mode="disabled", overwrite=True)
        heads[f"data: {traces.read_manifest(part)['examples']} train examples"] = R.Learned(head, 0.0)
    for rule in heads.values():
        check_held_out(rule, traces.read_manifest(args.test), "ablation head")

    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    extra = ["position", "draft_token", "target_argmax", "q_topk_probs", "p_topk_probs", "gap"]
    train_cols, train_ids = columns_of(args.train, [*F.POSITION_FEATURES, *extra])
    test_cols, test_ids = columns_of(args.test, [*F.POSITION_FEATURES, *F.TOKEN_FEATURES, *extra, "loss_q", "loss_p",
                                                 *F.HIDDEN_INPUTS])
    classes = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        classes = token_classes(AutoTokenizer.from_pretrained(args.tokenizer))
    train_x, test_x = research_inputs(train_cols, train_ids, classes), research_inputs(test_cols, test_ids, classes)
    fit = ~np.array([in_validation(e, 0.2, 0) for e in train_ids])  # the same split train-deferral uses
    identity = "spec v2 + token identity (per-token mean gap and frequency, drafted and target token)"
    train_identity, test_identity = token_identity(train_cols, train_ids, test_cols, fit)
    train_x[identity], test_x[identity] = np.c_[train_x["spec v2"], train_identity], np.c_[test_x["spec v2"], test_identity]
    gap = train_cols["gap"]
    scores = {}
    if "sklearn" not in groups:
        train_x = {}

    def mlp():
        return make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 64), early_stopping=True, n_iter_no_change=3,
                                                            batch_size=1024, max_iter=30, random_state=0))

    for label, x in train_x.items():
        scores[f"sklearn MLP, {label}"] = mlp().fit(x[fit], gap[fit]).predict(test_x[label])
        print(f"[{time.perf_counter() - started:.0f}s] sklearn MLP {label}", flush=True)
    if "sklearn" in groups:
        teacher = HistGradientBoostingRegressor(max_iter=500, learning_rate=0.05, early_stopping=True, random_state=0)
        teacher.fit(train_x["spec v2"][fit], gap[fit])
        scores["gradient-boosted trees, spec v2"] = teacher.predict(test_x["spec v2"])
        student = mlp().fit(train_x["spec v2"][fit], teacher.predict(train_x["spec v2"][fit]))
        scores["MLP distilled from the gradient-boosted teacher"] = student.predict(test_x["spec v2"])
        print(f"[{time.perf_counter() - started:.0f}s] trees and distillation", flush=True)

    columns = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in test_cols.items()
               if k in F.ALL_FEATURES or k in F.HIDDEN_INPUTS or k in offline.LOSS_COLUMNS}
    result = offline.compare_columns(columns, test_ids, offline.available(offline.DEFAULT_RULES, columns),
                                     heads, args.resamples, scores=scores)
    (args.out / "ablation.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"total {time.perf_counter() - started:.0f}s")


def table(result: dict) -> str:
    """Markdown: each head's deferral rate to close 90% of the gap, and its reduction against the best rule."""
    best = result["best_rule"]
    rate = lambda c: offline.interval(c["rate_to_close"]["0.9"])  # noqa: E731
    lines = ["| head | deferral rate to close 90% of the gap | fewer deferrals than " + best + " |", "|---|---|---|"]
    for label, c in result["candidates"].items():
        if c["kind"] == "head":
            reduction = offline.interval(c["against_rules"]["reduction_at_0.9"])
            lines.append(f"| {label} | {rate(c):.3f} | {reduction:.1%} |")
    lines.append(f"| best rule: {best} | {rate(result['candidates'][best]):.3f} | |")
    lines.append(f"| oracle | {rate(result['candidates']['oracle']):.3f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
