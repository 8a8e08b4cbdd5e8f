"""The command line, in process: typed --set values, named options, data stats on CSVs.

Train + evaluate of every backbone, the one-line errors and run folders are tested end to end
in tests/cli/."""

import json

import pytest

from cdsr.cli import main
from cdsr.config import ConfigError, make_config

def test_data_stats_synthetic(capsys):
    assert main(["data", "stats", "--data", "synthetic", "--set", "synthetic_preset=tiny"]) == 0
    out = capsys.readouterr().out
    assert "users        64" in out and "items        40 / 60" in out


def test_set_values_are_typed():
    cfg = make_config("sasrec", {}, ["lr=3e-4", "gca_positions=[0,1]", "gca_layer_norm=false", "epochs=4"])
    assert cfg["lr"] == 3e-4 and cfg["gca_positions"] == [0, 1] and cfg["gca_layer_norm"] is False
    assert cfg["epochs"] == 4
    with pytest.raises(ConfigError, match="epochs"):
        make_config("sasrec", {}, ["epochs=many"])
    # paths stay the text given, whatever it looks like (none / null: no path, the default)
    cfg = make_config("sasrec", {}, ["data_dir=2024", "cache_dir=true"])
    assert cfg["data_dir"] == "2024" and cfg["cache_dir"] == "true"
    assert make_config("llm4cdsr", {}, ["emb_cache_dir=null"])["emb_cache_dir"] is None
    # ranges are checked with the config, not deep inside a run
    for bad, key in (("lr=0", "lr"), ("weight_decay=-1", "weight_decay"), ("threads=-1", "threads"),
                     ("syn_signal=1.5", "signal"), ("syn_mean_len=0", "mean_len"), ("grad_clip=nan", "grad_clip"),
                     ("scale_to_match=[0.5]", "scale_to_match"), ("data_seed=-2", "data_seed")):
        with pytest.raises(ConfigError, match=key):
            make_config("cdsrnp", {}, [bad])


def test_named_options_map_to_config_keys(capsys):
    assert main(["train", "--gca", "0", "1", "--gca-activation", "tanh", "--no-gca-layernorm", "--heads", "4",
                 "--hidden", "32", "--list-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["gca_positions"] == [0, 1] and cfg["gca_activation"] == "tanh"
    assert cfg["gca_layer_norm"] is False and cfg["gca_heads"] == 4 and cfg["hidden"] == 32


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


def test_experiment_commands_are_part_of_the_cli(capsys):
    assert main(["experiment", "table", "--preset", "tiny", "--dry-run"]) == 0
    assert "runs planned" in capsys.readouterr().out
