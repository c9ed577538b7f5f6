"""The operating-point picker hits the requested deferral rate or loss on synthetic traces."""

from __future__ import annotations

import pytest

from speccascade.cli import main
from speccascade.deferral import rules as R
from speccascade.errors import SpeccascadeError
from speccascade.evaluation.operating_point import PICKABLE, operating_point
from speccascade.training import train_deferral
from tests.training.test_train import planted_traces


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_traces(tmp_path_factory.mktemp("op"), examples=100, rows=20)


@pytest.mark.parametrize("rule", ["chow", "opt", "bild", "diff"])
@pytest.mark.parametrize("rate", [0.1, 0.35, 0.8])
def test_picker_hits_the_requested_rate(planted, rule, rate):
    assert operating_point(str(planted), rule, target_deferral_rate=rate)["deferral_rate"] == pytest.approx(rate, abs=0.01)


def test_picker_for_a_learned_head_and_a_loss_target(planted, tmp_path):
    train_deferral([str(planted)], tmp_path / "head", epochs=10, batch_size=512, wandb_mode="disabled")
    spec = f"learned:{tmp_path / 'head'}"
    assert operating_point(str(planted), spec, target_deferral_rate=0.3)["deferral_rate"] == pytest.approx(0.3, abs=0.01)
    # planted gap is +-0.4 on half the rows: the head reaches loss 0.2 deferring about half; chow needs far more
    learned = operating_point(str(planted), spec, target_loss=0.2)
    assert learned["deferral_rate"] < 0.65
    with pytest.raises(SpeccascadeError, match="reaches no mean loss"):
        operating_point(str(planted), "chow", target_loss=0.05)


def test_the_command_ends_with_the_knob_and_the_rule_to_decode_with(planted, capsys):
    assert main(["operating-point", "--traces", str(planted), "--rule", "chow", "--target-deferral-rate", "0.3"]) == 0
    picked = operating_point(str(planted), "chow", target_deferral_rate=0.3)
    knob, use = capsys.readouterr().out.splitlines()[-4:-2]  # the CLI's two lines, then the call's
    assert knob == (f"operating-point: chow (asked: deferral rate 0.3): knob {picked['knob']:.6g} defers "
                    f"{picked['deferral_rate']:.3f} of the 2000 positions of {planted}")
    spec = use.removeprefix("operating-point: decode with ").split(" ")[0]
    assert R.parse(spec).build().alpha == pytest.approx(picked["knob"], rel=1e-5) and use.endswith("no file written")


def test_picker_bad_input(planted, capsys):
    with pytest.raises(SpeccascadeError, match="exactly one"):
        operating_point(str(planted), "opt")
    with pytest.raises(SpeccascadeError, match="in \\[0, 1\\]"):
        operating_point(str(planted), "opt", target_deferral_rate=1.5)
    assert main(["operating-point", "--traces", str(planted), "--rule", "topk", "--target-deferral-rate", "0.2"]) == 2
    assert "no operating-point picker for rule 'topk'" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["topk", "fly", "lossy", "always"])
def test_rules_without_a_picker_are_refused_in_one_line(planted, rule, capsys):
    """FLy scores trace rows since issue 24, but its knob is no cut of its score (-theta): still no picker."""
    assert main(["operating-point", "--traces", str(planted), "--rule", rule, "--target-deferral-rate", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no operating-point picker for rule {rule!r}; choose one of {', '.join(PICKABLE)}"]
