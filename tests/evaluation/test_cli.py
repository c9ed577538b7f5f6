"""The command line: the whole demo pipeline on tiny-random; bad input is one line and exit 2."""

from __future__ import annotations

import json

from speccascade.cli import main
from speccascade.evaluation.report import SPEED, summary_lines


def test_demo_pipeline_on_tiny_random(tmp_path, capsys):
    code = main(["demo", "--models", "tiny-random", "--out", str(tmp_path), "--train-examples", "16",
                 "--compare-examples", "6", "--eval-examples", "4", "--rules", "always,never,opt:0.3", "--max-new-tokens", "8",
                 "--block-size", "3", "--epochs", "2", "--wandb-mode", "disabled"])
    assert code == 0
    assert (tmp_path / "traces" / "manifest.json").exists() and (tmp_path / "head" / "model.safetensors").exists()
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    by_label = {p["label"]: p for p in result["points"]}
    assert by_label["speculative decoding"]["quality"] == by_label["target only"]["quality"]
    assert by_label["speculative decoding"]["deferral_rate"] == 1.0 and by_label["never"]["deferral_rate"] == 0.0
    assert any(p["rule"] == "learned" for p in result["points"])
    offline = json.loads((tmp_path / "compare" / "compare.json").read_text())  # the held-out offline comparison
    assert offline["traces"]["split"] == "test" and "head" in offline["candidates"]
    printed = capsys.readouterr().out
    assert "tokens/call" in printed and "quality_vs_cost.png" in printed and "rate to close 90%" in printed
    lines = printed.splitlines()  # each step says what it did, once; evaluate's table, verdicts and files come last
    assert [sum(line.startswith(f"{step}: wrote {tmp_path / d}") for line in lines) for step, d in (
        ("log-traces", "traces"), ("log-traces", "held-out-traces"), ("train-deferral", "head"), ("compare", "compare"),
        ("evaluate", "eval"))] == [1, 1, 1, 1, 1]
    assert lines[-3].startswith("speed: measured side by side") and lines[-2].startswith(f"evaluate: wrote {tmp_path / 'eval'}")
    assert lines[-1].startswith("demo: finished in ") and lines[-1].endswith(f"every step's outputs under {tmp_path}")
    header = next(line for line in lines if "tokens/call" in line)
    assert "latency" not in header  # the points ran one after another: their wall times are not compared here
    # a second run reuses the complete traces instead of refusing the directory
    assert main(["demo", "--models", "tiny-random", "--out", str(tmp_path), "--train-examples", "16",
                 "--compare-examples", "6", "--eval-examples", "2", "--rules", "always", "--max-new-tokens", "4", "--block-size", "3",
                 "--epochs", "1", "--wandb-mode", "disabled"]) == 0


def test_config_file_and_flags(tmp_path, capsys):
    config = tmp_path / "evaluate.yaml"
    config.write_text(f"models: tiny-random\nrules: never\nlimit: 3\nmax_new_tokens: 4\nout: {tmp_path / 'x'}\nwandb_mode: disabled\n")
    assert main(["evaluate", "--config", str(config), "--max-new-tokens", "2", "--out", str(tmp_path / "y")]) == 0
    result = json.loads((tmp_path / "y" / "results.json").read_text())
    assert all(p["new_tokens"] == 3 * 2 for p in result["points"])  # flags override the file
    # the command ends with the table (intervals, no latency), the verdicts, where speed is measured, the files
    lines, out = capsys.readouterr().out.splitlines(), tmp_path / "y"
    assert lines[-1] == "evaluate: wrote " + ", ".join(str(out / name) for name in ("report.md", "quality_vs_cost.png",
                                                                                    "results.json", "results.csv"))
    assert lines[-2] == SPEED and lines[-3:-2] == summary_lines(result) and lines[-3].startswith("never: ")
    header = next(line for line in lines if "tokens/call" in line)
    assert all(column in header for column in ("decoder", "quality", "vs target", "deferred")) and "latency" not in header
    for p in result["points"]:
        quality = f"{p['quality']:.3f} [{p['quality_low']:.3f}, {p['quality_high']:.3f}]"
        assert any(p["label"] in line and quality in line and f"{p['deferral_rate']:.2f}" in line for line in lines)
    assert "wall time of sequential runs" in (out / "report.md").read_text()  # its latency column says what it is


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["demo", "--models", "nope", "--out", str(tmp_path), "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown preset 'nope'") and "\n" not in err
