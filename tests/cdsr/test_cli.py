"""The command line: data stats, clear errors for unknown names, train + evaluate agree."""

import json

import pytest

from cdsr.cli import main
from cdsr.config import ConfigError, make_config

TINY = ["--set", "synthetic_preset=tiny", "--set", "eval_negatives=20", "--set", "max_len=20",
        "--set", "threads=1", "--set", "progress=never", "--hidden", "16", "--set", "ffn_inner=32"]


def test_data_stats_synthetic(capsys):
    assert main(["data", "stats", "--data", "synthetic", "--set", "synthetic_preset=tiny"]) == 0
    out = capsys.readouterr().out
    assert "users        64" in out and "items        40 / 60" in out


def test_unknown_names_list_choices(capsys):
    assert main(["train", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "valid models:" in err and "sasrec" in err
    assert main(["data", "stats", "--data", "nope"]) == 2
    assert "valid choices: synthetic, abe, afk, csv" in capsys.readouterr().err
    assert main(["train", "--set", "nope=1"]) == 2
    assert "valid keys:" in capsys.readouterr().err
    assert main(["train", "--gca", "7"]) == 2
    assert "valid positions: [0, 1]" in capsys.readouterr().err
    assert main(["train", "--set", "synthetic_preset=huge", "--epochs", "1"]) == 2
    assert "valid choices: tiny, small, afk" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--gca-activation", "relu"])


def test_set_values_are_typed():
    cfg = make_config("sasrec", {}, ["lr=3e-4", "gca_positions=[0,1]", "gca_layer_norm=false", "epochs=4"])
    assert cfg["lr"] == 3e-4 and cfg["gca_positions"] == [0, 1] and cfg["gca_layer_norm"] is False
    assert cfg["epochs"] == 4
    with pytest.raises(ConfigError, match="epochs"):
        make_config("sasrec", {}, ["epochs=many"])


def test_named_options_map_to_config_keys(capsys):
    assert main(["train", "--gca", "0", "1", "--gca-activation", "tanh", "--no-gca-layernorm", "--heads", "4",
                 "--hidden", "32", "--list-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["gca_positions"] == [0, 1] and cfg["gca_activation"] == "tanh"
    assert cfg["gca_layer_norm"] is False and cfg["gca_heads"] == 4 and cfg["hidden"] == 32


def test_train_then_evaluate_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--gca", "0", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "test   A" in printed and "alignment gca0_ab" in printed
    results = json.loads((out / "results.json").read_text())
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    # same candidates (seeded), same model: exactly the same numbers
    assert again["test"] == results["test"]
    assert again["valid"] == results["valid"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_data_stats_csv(tmp_path, capsys):
    rows_a = [(f"A{u:013d}", f"{i:010d}", 10 * u + i) for u in range(6) for i in range(3)]
    rows_b = [(f"A{u:013d}", f"B{i:09d}", 10 * u + i + 5) for u in range(6) for i in range(4)]
    for name, rows in (("a.csv", rows_a), ("b.csv", rows_b)):
        # 2018 column order: item,user,rating,timestamp
        (tmp_path / name).write_text("".join(f"{i},{u},5.0,{t}\n" for u, i, t in rows))
    args = ["data", "stats", "--data", "csv", "--csv-a", str(tmp_path / "a.csv"), "--csv-b",
            str(tmp_path / "b.csv"), "--cache-dir", str(tmp_path / "cache"), "--set", "item_min=2",
            "--set", "user_min_per_domain=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "users        6" in out and "items        3 / 4" in out and "interactions 42" in out
    assert main(["data", "stats", "--data", "csv"]) == 2
    assert "--csv-a" in capsys.readouterr().err


def test_scale_to_match_records_both_parameter_counts(tmp_path, capsys):
    out = tmp_path / "scaled"
    assert main(["train", "--model", "cdsrnp", "--scale-to-match", "0", "--epochs", "1", "--out", str(out),
                 *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["scale_to_match"] == [0] and results["config"]["gca_positions"] == []
    # the widened bare backbone matches backbone + GCA[0] within the 2%
    assert abs(results["n_params"] - results["n_params_target"]) <= 0.02 * results["n_params_target"]
    assert results["n_params_target"] > 0 and results["alignment"] == {}
    # a model without the key names it and lists the valid ones
    assert main(["train", "--model", "sasrec", "--scale-to-match", "0", "--list-config"]) == 2
    assert "scale_to_match" in capsys.readouterr().err


def test_experiment_commands_are_part_of_the_cli(capsys):
    assert main(["experiment", "table", "--preset", "tiny", "--dry-run"]) == 0
    assert "runs planned" in capsys.readouterr().out
