"""Deferral heads: a planted signal is learned, checkpoints round-trip, the learned rule is exact when forced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from speccascade import SpeculativeCascade, rules
from speccascade.data import traces
from speccascade.tracing.log_traces import log_traces
from speccascade.deferral import features as F
from speccascade.deferral.heads import DeferralHead
from speccascade.errors import SpeccascadeError
from speccascade.training import train_deferral


def planted_traces(directory: Path, examples: int = 200, rows: int = 20, seed: int = 0) -> Path:
    """Random features; deferring pays exactly where ``kl_qp`` is high, which no fixed rule reads."""
    rng = np.random.default_rng(seed)
    n = examples * rows
    cols = {name: rng.random(n).astype(np.float32) for name in F.POSITION_FEATURES}
    gap = np.where(cols["kl_qp"] > 0.5, 0.4, -0.4) + rng.normal(0, 0.05, n)
    cols |= {"loss_p": np.full(n, 0.3, np.float32), "gap": gap.astype(np.float32)}
    cols["loss_q"] = (cols["loss_p"] + cols["gap"]).astype(np.float32)
    ids = np.repeat([f"ex-{i:04d}" for i in range(examples)], rows).astype(object)
    writer = traces.ShardWriter(directory, rank=0)
    writer.write({"example_id": ids} | cols, [f"ex-{i:04d}" for i in range(examples)])
    traces.write_manifest(directory, {"config": {}, "feature_spec": F.spec()}, complete=True)
    return directory


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_traces(tmp_path_factory.mktemp("planted"))


def test_head_recovers_a_signal_no_fixed_rule_sees(planted, tmp_path):
    head = train_deferral([str(planted)], tmp_path / "head", head="mlp", objective="classification", epochs=15,
                          batch_size=512, wandb_mode="disabled")
    assert head.metrics["auroc"] > 0.9
    rows = traces.load_traces(planted).with_format("numpy")[:]
    target = rows["gap"] > 0
    fixed_scores = {  # each fixed rule's deferral score (defer when high)
        "chow": -rows["q_top1"], "diff/opt": rows["p_top1"] - rows["q_top1"], "bild": rows["tv"],
    }
    best_fixed = max(roc_auc_score(target, s) for s in fixed_scores.values())
    assert best_fixed < 0.6 < head.metrics["auroc"]
    areas = head.metrics["offline_area"]  # mean best loss over deferral budgets: lower is better
    assert areas["learned"] < 0.8 * min(v for k, v in areas.items() if k != "learned")
    assert {"comparison.csv", "comparison.png", "reliability.png", "metrics.json"} <= {p.name for p in (tmp_path / "head").iterdir()}
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["feature_spec"]["version"] == F.SPEC_VERSION and config["features"] == list(F.POSITION_FEATURES)
    assert config["calibration"]["method"] == "platt" and len(config["mean"]) == len(F.POSITION_FEATURES)
    rates = {float(k): v for k, v in config["operating_points"].items() if k != "default"}
    assert list(rates.values()) == sorted(rates.values(), reverse=True)  # more deferral, lower threshold


@pytest.mark.parametrize("objective", ["gap", "relaxed"])
def test_other_objectives_learn_the_signal(planted, tmp_path, objective):
    head = train_deferral([str(planted)], tmp_path / objective, head="logistic" if objective == "gap" else "mlp",
                          objective=objective, features=["kl_qp", "q_top1", "tv"], epochs=15, batch_size=512, lr=0.03,
                          wandb_mode="disabled")
    assert head.metrics["auroc"] > 0.9


def test_missing_label_columns_are_named(tmp_path, planted):
    with pytest.raises(SpeccascadeError, match=r"lack columns \['q_tok', 'p_tok'"):
        train_deferral([str(planted)], tmp_path / "x", head="token-mlp", epochs=1, wandb_mode="disabled")


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory, pair):
    """A head trained on real tiny-random reference traces."""
    root = tmp_path_factory.mktemp("tiny")
    log_traces(root / "traces", models="tiny-random", task="arithmetic", limit=24, mode="reference", topk=0)
    train_deferral([str(root / "traces")], root / "head", head="mlp", epochs=3, batch_size=256, wandb_mode="disabled")
    return root / "head"


def test_checkpoint_round_trip_decides_the_same_in_the_decoder(tiny_head, pair, batch):
    ids, mask = batch
    loaded = rules.Learned.from_pretrained(tiny_head)
    in_memory = rules.Learned(DeferralHead.from_pretrained(tiny_head), threshold=loaded.threshold)
    outs = [SpeculativeCascade(pair, rule, block_size=4, temperature=1.0).generate(ids, mask, max_new_tokens=16, seed=5)
            for rule in (loaded, in_memory)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[0].stats.deferrals == outs[1].stats.deferrals
    assert rules.parse(f"learned:{tiny_head}@0.3").build().threshold == 0.3


def test_forced_defer_learned_rule_is_exact_speculative_decoding(tiny_head, pair, batch):
    ids, mask = batch
    forced = rules.Learned.from_pretrained(tiny_head, threshold=rules.Learned.EXACT)
    out = SpeculativeCascade(pair, forced, block_size=4).generate(ids, mask, max_new_tokens=16)
    target = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=4).generate(ids, mask, max_new_tokens=16)
    assert torch.equal(out.sequences, target.sequences) and out.stats.deferrals == out.stats.decided


def test_loading_refuses_another_feature_spec_or_a_non_head(tiny_head, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("config.json", "model.safetensors"):
        (changed / name).write_bytes((tiny_head / name).read_bytes())
    config = json.loads((changed / "config.json").read_text())
    config["feature_spec"]["version"] = F.SPEC_VERSION + 1
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpeccascadeError, match=f"trained on feature spec {F.SPEC_NAME} v{F.SPEC_VERSION + 1}"):
        rules.Learned.from_pretrained(changed)
    with pytest.raises(SpeccascadeError, match="is not a deferral head"):
        rules.parse(f"learned:{tmp_path}").build()


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_lowers_ece_of_a_miscalibrated_head(method):
    from speccascade.training import calibration as cal

    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 20_000)
    targets = (rng.random(20_000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    overconfident = 4 * true_logit + 1.0  # a head that is far too sure, and biased
    head = DeferralHead(["q_top1"], kind="logistic", calibration=cal.fit(method, overconfident[:10_000], targets[:10_000]))
    before = cal.expected_calibration_error(1 / (1 + np.exp(-overconfident[10_000:])), targets[10_000:])
    after = cal.expected_calibration_error(head.probability(torch.from_numpy(overconfident[10_000:])).numpy(), targets[10_000:])
    assert before > 0.1 and after < 0.03


def test_alpha_conditioned_head_serves_the_trade_off_curve(tmp_path):
    """One relaxed head, conditioned on alpha: asking for a higher deferral cost defers less."""
    directory = planted_traces(tmp_path / "traces")
    head = train_deferral([str(directory)], tmp_path / "head", objective="relaxed", alpha=0.5, alpha_range=(0.0, 2.0),
                          features=["kl_qp", "tv"], epochs=15, batch_size=512, lr=0.03, wandb_mode="disabled")
    rows = traces.load_traces(directory).with_format("torch")[:]
    f = {"kl_qp": rows["kl_qp"], "tv": rows["tv"]}
    rates = [rules.Learned(head, threshold=0.5, alpha=a).decide(f).float().mean().item() for a in (0.0, 0.6, 1.8)]
    assert rates[0] > rates[1] > rates[2]
    # the relaxed optimum defers iff loss_q - loss_p = +-0.4 exceeds alpha * tv (tv uniform on [0, 1])
    assert rates[0] == pytest.approx(0.5, abs=0.07) and rates[2] < 0.15
    with pytest.raises(SpeccascadeError, match="needs objective 'relaxed'"):
        train_deferral([str(directory)], tmp_path / "x", objective="gap", alpha_range=(0.0, 1.0), wandb_mode="disabled")


def test_hidden_state_head_trains_and_decodes(tmp_path, pair, batch):
    """A head on both models' last hidden states, from traces logged with --hidden-states both."""
    log_traces(tmp_path / "traces", models="tiny-random", task="arithmetic", limit=16, mode="reference",
               topk=0, hidden_states="both")
    head = train_deferral([str(tmp_path / "traces")], tmp_path / "head", head="hidden-mlp", objective="classification", epochs=2,
                          wandb_mode="disabled")
    assert len(head.mean) == len(F.POSITION_FEATURES) + 2 * 64  # scalar features + two 64-wide hidden states
    rule = rules.Learned.from_pretrained(tmp_path / "head")
    assert rule.needs_hidden
    ids, mask = batch
    out = SpeculativeCascade(pair, rule, block_size=3, temperature=0).generate(ids, mask, max_new_tokens=8)
    assert out.stats.new_tokens == 8 * len(ids)
    forced = rules.Learned.from_pretrained(tmp_path / "head", threshold=rules.Learned.EXACT)
    exact = SpeculativeCascade(pair, forced, block_size=3).generate(ids, mask, max_new_tokens=8)
    target = SpeculativeCascade(pair, rules.AlwaysDefer(), block_size=3).generate(ids, mask, max_new_tokens=8)
    assert torch.equal(exact.sequences, target.sequences)


def test_early_stopping_keeps_the_best_epoch(planted, tmp_path):
    """With patience, training stops once the validation loss stalls and the exported head is the best epoch's."""
    import csv

    from speccascade.training.data import TraceDataModule
    from speccascade.training.module import objective_loss

    head = train_deferral([str(planted)], tmp_path / "head", objective="gap", features=["kl_qp", "q_top1"], epochs=60,
                          patience=2, batch_size=256, lr=0.05, wandb_mode="disabled")
    with (tmp_path / "head" / "logs" / "version_0" / "metrics.csv").open() as f:
        losses = [float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")]
    assert len(losses) < 60 and min(losses) < losses[-1]  # stopped early, after epochs that did not improve
    data = TraceDataModule([str(planted)], ["kl_qp", "q_top1"], "gap", 0.2, 4096, 0)
    data.setup()
    with torch.no_grad():
        batches = [(objective_loss("gap", head(b["x"]), b["y"], 0.0), len(b["x"])) for b in data.val_dataloader()]
    exported = sum(loss * n for loss, n in batches) / sum(n for _, n in batches)
    assert float(exported) == pytest.approx(min(losses), rel=1e-4)
