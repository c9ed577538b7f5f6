"""The command line: the demo runs end to end on tiny-random; bad input is one line and exit 2."""

from __future__ import annotations

import json

from speccascade.cli import main


def test_demo_on_tiny_random_writes_consistent_stats(tmp_path, capsys):
    code = main(["demo", "--models", "tiny-random", "--rules", "always,never,opt:0.3", "--max-new-tokens", "8",
                 "--block-size", "3", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    by_name = {r["name"]: r for r in report["results"]}
    assert list(by_name) == ["target only", "speculative decoding", "never", "opt:0.3"]
    assert by_name["speculative decoding"]["texts"] == by_name["target only"]["texts"]
    assert by_name["never"]["stats"]["deferral_rate"] == 0.0
    assert by_name["speculative decoding"]["stats"]["deferral_rate"] == 1.0
    assert "tokens/call" in capsys.readouterr().out


def test_config_file_and_flags(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("models: tiny-random\nrules: never\nmax_new_tokens: 4\n")
    assert main(["demo", "--config", str(config), "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert all(r["stats"]["new_tokens"] == 3 * 4 for r in report["results"])  # flag overrides the file


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["demo", "--models", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown preset 'nope'") and "\n" not in err
    assert main(["demo", "--models", "tiny-random", "--rules", "always,bogus:1"]) == 2
    assert "unknown rule 'bogus'" in capsys.readouterr().err
