"""FLy on trace rows (``compare``): each row's block is found through its columns (example, turn, block), and the
offline decision is the decoder's, whatever the rows' order, ties included; traces logged before the ``turn`` column
read as turn 0; the comparison reports FLy's curve by theta."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import concatenate_datasets

from speccascade.data import traces
from speccascade.deferral import rules
from speccascade.errors import SpeccascadeError
from speccascade.evaluation import offline
from tests.training.test_outcome_head import GAMMA, planted_blocks, rows_of, write_planted

EXAMPLES, SEED = 20, 3


@pytest.fixture(scope="module")
def blocks():
    return planted_blocks(examples=EXAMPLES, seed=SEED)


def turn_rows(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The blocks' rows (:func:`rows_of`) as two-turn examples: planted examples 2k and 2k + 1 are turns 0 and 1 of
    example k, each turn's positions from 0 (as the decoder counts them), so only ``turn`` tells their blocks apart."""
    cols = rows_of(blocks)
    return cols | {"example_index": cols["example_index"] // 2, "turn": cols["example_index"] % 2}


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("theta", [0.0, 0.15, 0.25, 1.1])  # the planted top-3 entropies lie in 0.07-0.37
def test_offline_fly_decides_as_the_decoder_in_any_row_order(blocks, theta, window):
    rule = rules.FLy(theta=theta, window=window)
    live = rule.defer(blocks["p"], blocks["draft"][:, :GAMMA])[:, :GAMMA].reshape(-1)
    cols = turn_rows(blocks)
    shuffled = torch.randperm(len(live), generator=torch.Generator().manual_seed(window))
    offline_rows = rule.decide({name: value[shuffled] for name, value in cols.items()})
    assert torch.equal(offline_rows, live[shuffled])
    assert torch.equal(rule.score(cols) > rule.cut, live)  # the score compared with -theta: the curves' decisions
    assert 0 < live.float().mean() < 1 or theta == 1.1  # both decisions occur, but at the exact knob


def test_a_dropped_row_confirms_no_window(blocks):
    cols = turn_rows(blocks)
    rule = rules.FLy(theta=0.0, window=1)
    kept = ~rule.decide(cols)
    first = int(torch.nonzero(kept)[0])  # a kept mismatch: the next row of its block confirmed it
    without_next = {name: torch.cat([value[: first + 1], value[first + 2 :]]) for name, value in cols.items()}
    assert rule.decide(without_next)[first]


def test_compare_scores_fly_and_reports_its_curve_by_theta(blocks):
    cols = {name: value.float() for name, value in turn_rows(blocks).items()}
    cols |= {"loss_q": cols["outcome_harm"], "loss_p": torch.zeros_like(cols["outcome_harm"])}
    examples = cols["example_index"].long().numpy().astype(str)
    assert offline.available("gain,fly", cols) == ["gain", "fly"] and offline.available("fly", {"p_top1": 0}) == []
    result = offline.compare_columns(cols, examples, "gain,fly", resamples=50)
    points = result["candidates"]["fly:window=2"]["points"]
    finite = [p for p in points if np.isfinite(p["knob"])]
    assert len(finite) > 10 and all(a["knob"] <= b["knob"] for a, b in zip(finite, finite[1:]))  # theta grows with the rate
    assert all(0.05 < p["knob"] < 0.4 for p in finite)  # thetas among the planted top-3 entropies, not their negatives
    with pytest.raises(SpeccascadeError, match="columns example_index, turn, position, position_in_block are missing"):
        rules.FLy().score({k: v for k, v in cols.items() if k not in ("example_index", "turn", "position", "position_in_block")})


def test_offline_fly_settles_a_tie_as_the_decoder(blocks):
    """At ``H3 = theta`` the decoder's gate (``H3 > theta``) is shut: ``decide`` defers there, where ``score > cut``
    would keep (why FLy overrides it)."""
    cols = turn_rows(blocks)
    scores = rules.FLy(window=1).score(cols)
    row = int(torch.nonzero(torch.isfinite(scores))[0])  # a keepable mismatch; theta is its top-3 entropy
    rule = rules.FLy(theta=-float(scores[row]), window=1)
    live = rule.defer(blocks["p"], blocks["draft"][:, :GAMMA])[:, :GAMMA].reshape(-1)
    assert live[row] and not rule.score(cols)[row] > rule.cut
    assert torch.equal(rule.decide(cols), live)


def test_traces_logged_before_the_turn_column_read_as_turn_0(blocks, tmp_path):
    """Traces without ``turn`` (logged before it) load with turn 0, and FLy finds their blocks as the decoder's."""
    directory = write_planted(tmp_path / "old", examples=EXAMPLES, seed=SEED)  # the blocks' rows, written without turn
    manifest = traces.read_manifest(directory)
    assert "turn" not in traces.read_parquet(directory / manifest["shards"][0]["file"]).column_names
    assert "turn" in traces.columns(directory, manifest)
    old = traces.load_traces(directory)
    rows = old.with_format("torch")[:]
    rule = rules.FLy(theta=0.15)
    assert rows["turn"].tolist() == [0] * len(rows["turn"])
    new = traces.load_traces(write_turned(tmp_path / "new", directory), verify=False)
    assert old.features["turn"] == new.features["turn"]  # so old and new traces train together
    assert len(concatenate_datasets([old, new])) == 2 * len(old)
    live = rule.defer(blocks["p"], blocks["draft"][:, :GAMMA])[:, :GAMMA].reshape(-1)
    assert torch.equal(rule.decide({c: rows[c] for c in rule.columns}), live) and 0 < live.float().mean() < 1


def write_turned(target, source):
    """A copy of the traces in ``source`` with the ``turn`` column as the trace logger writes it (int32, schema.to_numpy);
    its checksums no longer match (load it with ``verify=False``)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(source, target)
    for shard in traces.read_manifest(target)["shards"]:
        path = target / shard["file"]
        table = pq.read_table(path)
        pq.write_table(table.append_column("turn", pa.array(np.zeros(table.num_rows, dtype=np.int32))), path)
    return target


def test_offline_fly_on_on_policy_traces_is_the_decoders_fly(tmp_path):
    """Traces logged while decoding under FLy: offline, each row's decision is the one the decoder took, wherever the
    row's window was logged (drafts past the reply's end are not)."""
    from speccascade.data import traces
    from speccascade.tracing.log_traces import log_traces

    log_traces(tmp_path / "t", models="tiny-random", task="arithmetic", limit=8, mode="on-policy", rule="fly:0.0:window=1",
               max_new_tokens=24, topk=0)
    rows = traces.load_traces(tmp_path / "t").with_format("torch")[:]
    rule = rules.FLy(theta=0.0, window=1)
    offline_rows = rule.decide({c: rows[c] for c in rule.columns})
    live = rows["deferred"].bool()
    at = list(zip(rows["example_index"].tolist(), (rows["position"] - rows["position_in_block"]).tolist(),
                  rows["position_in_block"].tolist()))
    logged = set(at)
    window_logged = torch.tensor([(e, b, i + 1) in logged or i + 1 >= 5 for e, b, i in at])  # block size 5
    assert window_logged.float().mean() > 0.9 and (~live).sum() > 10  # most windows logged; FLy kept drafts
    assert torch.equal(offline_rows[window_logged], live[window_logged])


def test_compare_judges_fly_on_reference_traces(tmp_path):
    from speccascade.evaluation.compare import compare
    from speccascade.tracing.log_traces import log_traces

    log_traces(tmp_path / "t", models="tiny-random", task="arithmetic", limit=8, mode="reference", topk=0)
    result = compare(str(tmp_path / "t"), tmp_path / "c", rules="gain,fly:window=1", resamples=20, wandb_mode="disabled")
    fly = result["candidates"]["fly:window=1"]
    assert result["best_rule"] in ("gain", "fly:window=1") and fly["area"]["estimate"] > 0
    assert (tmp_path / "c" / "compare.json").exists()


def test_fly_curve_lies_where_theta_reaches_and_keeps_the_drafters_loss_below(blocks):
    """Rows no theta keeps (score +inf) defer at every knob: the curve starts at FLy's least deferral, with a point
    per kept row beyond it (not 190 points at rate 0 labelled theta = -inf), and the budgets below it are the
    drafter's loss (deferring nothing), as before."""
    cols = {name: value.float() for name, value in turn_rows(blocks).items()}
    cols |= {"loss_q": cols["outcome_harm"], "loss_p": torch.zeros_like(cols["outcome_harm"])}
    result = offline.compare_columns(cols, cols["example_index"].long().numpy().astype(str), "fly", resamples=20)
    fly = result["candidates"]["fly:window=2"]
    least = float(rules.FLy(theta=-1.0).decide(cols).float().mean())  # every keepable row kept
    keepable = round((1 - least) * len(cols["p_tok"]))
    rates = [p["deferral_rate"] for p in fly["points"]]
    assert 0.5 < least < 1 and min(rates) == pytest.approx(least) and len(set(rates)) >= keepable > 10
    assert all(np.isfinite(p["knob"]) for p in fly["points"][:-1])  # each a theta (the last defers all: +inf)
    below = np.asarray(result["rates"]) < least - 1e-9
    assert np.allclose(np.asarray(fly["budget"]["loss"])[below], result["loss_keep_all"]["estimate"])
