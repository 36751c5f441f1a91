"""Config: defaults, YAML and --set overrides, and the exit-2 errors that name the key and the fix."""
from __future__ import annotations

import re

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import Config, ConfigError, load_config
from pipeline.config_yaml import describe, render_yaml


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("workdir: w\nembed: {batch_size: 8}\nsample: {prompts: [a, b]}\n")
    cfg = load_config(path, ["embed.batch_size=16", "dedup.cosine_threshold=0.8", "index.nprobe=20",
                             "embed.pretrained=null", "sample.prompts=one prompt"])
    assert cfg.workdir == "w"
    assert cfg.embed.batch_size == 16
    assert cfg.dedup.cosine_threshold == 0.8
    assert cfg.index.nprobe == 20
    assert cfg.embed.pretrained is None
    assert cfg.sample.prompts == ["one prompt"]
    assert load_config(None).download.image_size == Config().download.image_size


def test_int_accepted_where_float_expected():
    assert load_config(None, ["download.timeout=3"]).download.timeout == 3.0


@pytest.mark.parametrize("key, text, value", [
    ("train.lr", "1e-4", 1e-4), ("train.lr", "5E3", 5000.0), ("train.lr", "+3e0", 3.0), ("train.lr", "2.5e-3", 2.5e-3),
    ("train.lr", ".5e1", 5.0), ("train.lr", "1.", 1.0), ("dedup.cosine_threshold", "-2e-1", -0.2),
    ("dedup.cosine_threshold", "-2E+0", None), ("train.minutes", "1e+1", 10.0), ("download.max_image_area", "1e6", 1e6),
])
def test_scientific_notation_without_a_dot_is_a_number(key, text, value, tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 and 5E3 as strings; a number field takes them as the float they spell,
    from --set, from a file, and quoted in a file; the limits still apply to the number."""
    section, leaf = key.split(".")
    (tmp_path / "plain.yaml").write_text(f"{section}:\n  {leaf}: {text}\n")
    (tmp_path / "quoted.yaml").write_text(f"{section}:\n  {leaf}: '{text}'\n")
    for load in (lambda: load_config(None, [f"{key}={text}"]), lambda: load_config(tmp_path / "plain.yaml"),
                 lambda: load_config(tmp_path / "quoted.yaml")):
        if value is None:
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be at least -1\.0, got -2\.0$"):
                load()
            continue
        got = getattr(getattr(load(), section), leaf)
        assert got == value and type(got) is float


def test_lr_1e_4_from_the_cli_and_a_user_file(tmp_path, capsys):
    """The reported bug: `--set train.lr=1e-4` and `lr: 1e-4` in stages.yaml were refused as '1e-4' (str)."""
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # the YAML 1.1 behaviour the fix works around
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4
    (tmp_path / "stages.yaml").write_text("train:\n  lr: 1e-4\npack:\n  vq_lr: 3E-4\n")
    cfg = load_config(tmp_path / "stages.yaml", ["evaluate.guidance=2e0"])
    assert (cfg.train.lr, cfg.pack.vq_lr, cfg.evaluate.guidance) == (1e-4, 3e-4, 2.0)
    assert main(["status", "--set", "train.lr=abc", "--set", f"workdir={tmp_path / 'w'}"]) == 2
    assert "train.lr must be a number, got 'abc' (str)" in capsys.readouterr().err


def test_with_values_still_takes_typed_numbers_and_refuses_nan():
    """evaluate's --guidance/--steps (argparse float/int) reach the config through with_values."""
    import math

    from pipeline.config import with_values

    cfg = with_values(Config(), {"evaluate.guidance": 1e-4, "evaluate.steps": 7})
    assert (cfg.evaluate.guidance, cfg.evaluate.steps) == (1e-4, 7)
    with pytest.raises(ConfigError, match=r"^evaluate\.guidance must be a finite number, got nan"):
        with_values(Config(), {"evaluate.guidance": math.nan})


@pytest.mark.parametrize("override, message", [
    (["train.lr=abc"], r"^train\.lr must be a number, got 'abc' \(str\)$"),
    (["train.lr=1e-4x"], r"^train\.lr must be a number, got '1e-4x' \(str\)$"),
    (["train.lr=1_0e-4"], r"^train\.lr must be a number, got '1_0e-4' \(str\)$"),
    (["train.lr=1e-"], r"^train\.lr must be a number, got '1e-' \(str\)$"),
    (["train.lr=e5"], r"^train\.lr must be a number, got 'e5' \(str\)$"),
    (["train.lr=nan"], r"^train\.lr must be a number, got 'nan' \(str\)$"),
    (["train.lr=inf"], r"^train\.lr must be a number, got 'inf' \(str\)$"),
    (["train.lr=-Infinity"], r"^train\.lr must be a number, got '-Infinity' \(str\)$"),
    (["train.lr=.nan"], r"^train\.lr must be a finite number, got nan: give a number of at least 0\.0$"),
    (["train.lr=1e999"], r"^train\.lr must be a finite number, got '1e999': give a number of at least 0\.0$"),
    (["train.minutes=-1e999"], r"^train\.minutes must be a finite number, got '-1e999': give a number of at least 0\.0, or null$"),
    (["train.lr=-1e-4"], r"^train\.lr must be at least 0\.0, got -0\.0001$"),
    (["train.steps=1e3"], r"^train\.steps must be an integer, got '1e3' \(str\): write a whole number in plain digits, e\.g\. 1000$"),
    (["train.steps=1000.0"], r"^train\.steps must be an integer, got 1000\.0 \(float\): write a whole number in plain digits, e\.g\. 1000$"),
    (["train.k=2.5e0"], r"^train\.k must be an integer, got '2\.5e0' \(str\): write a whole number in plain digits$"),
    (["train.steps=many"], r"^train\.steps must be an integer, got 'many' \(str\)$"),
])
def test_numbers_that_are_refused(override, message):
    """Only plain decimal/scientific text becomes a float: nan/inf spelled out, hex, underscores stay strings and are
    refused (0x10 is YAML 1.1 for 16, as before); an integer field does not round 1e3 or 1000.0 but says how to write it."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


@pytest.mark.parametrize("override, message", [
    (["embed.batchsize=3"], r"unknown config key embed\.batchsize: did you mean embed\.batch_size\?"),
    (["nosuchsection.x=1"], r"unknown config key nosuchsection"),
    (["embed.batch_size=many"], r"embed\.batch_size must be a integer|embed\.batch_size must be an? integer"),
    (["index.refine=3"], r"index\.refine must be a boolean"),
    (["embed.batch_size=0"], r"embed\.batch_size must be at least 1, got 0"),
    (["dedup.cosine_threshold=1.5"], r"dedup\.cosine_threshold must be at most 1\.0"),
    (["evaluate.guidance=.nan"], r"evaluate\.guidance must be a finite number, got nan: give a number of at least 0\.0$"),
    (["dedup.cosine_threshold=-.inf"], r"dedup\.cosine_threshold must be a finite number, got -inf: give a number from -1\.0 to 1\.0$"),
    (["train.minutes=.inf"], r"train\.minutes must be a finite number, got inf: give a number of at least 0\.0, or null$"),
    (["download.resize_mode=stretch"], r"download\.resize_mode must be one of no, border"),
    (["index.memory_budget=lots"], r'index\.memory_budget must be a size such as "4GB"'),
    (["index.nprobe=fast"], r'index\.nprobe must be "auto" or a positive integer'),
    (["neighbours.actors=many"], r'neighbours\.actors must be "auto" or a positive integer'),
    (["neighbours.actors=0"], r"neighbours\.actors must be at least 1, got 0"),
    (["embed.decode_workers=lots"], r'embed\.decode_workers must be "auto" or a positive integer'),
    (["embed.encoders=many"], r'embed\.encoders must be "auto" or a positive integer'),
    (["embed.encoders=0"], r"embed\.encoders must be at least 1, got 0"),
    (["neighbours.k=10", "neighbours.candidates=5"], r"neighbours\.candidates \(5\) must exceed neighbours\.k \(10\)"),
    (["embed.model=null"], r"embed\.model must not be null"),
    (["embed.batch_size"], r"expected key\.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_non_finite_numbers_are_refused_everywhere_null_still_passes(tmp_path):
    """nan compares False with every bound, so without a finiteness check it passed min/max; inf passed one-sided
    bounds. Every float field refuses both, from a file, --set or typed values; null stays valid where it was."""
    import dataclasses
    import math
    import typing

    from pipeline.config import to_dict, with_values

    cfg = Config()
    sections = [s.name for s in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, s.name))]
    floats = [f"{name}.{key}" for name in sections for key, hint in typing.get_type_hints(type(getattr(cfg, name))).items()
              if hint is float or float in typing.get_args(hint)]
    assert len(floats) == 23 and "evaluate.guidance" in floats and "sample.neighbour_guidance" in floats and "train.minutes" in floats
    for key in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got {bad!r}: give a number"):
                with_values(cfg, {key: bad})
    assert with_values(cfg, {"train.minutes": None, "download.max_image_area": None}).train.minutes is None
    data = to_dict(cfg)
    data["evaluate"]["guidance"] = math.nan
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump({"evaluate": data["evaluate"]}))
    assert ".nan" in (tmp_path / "nan.yaml").read_text()
    with pytest.raises(ConfigError, match=r"^evaluate\.guidance must be a finite number, got nan"):
        load_config(tmp_path / "nan.yaml")


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(notmap)


@pytest.mark.parametrize("args, key", [
    (["run", "download", "--set", "download.treads=4"], "download.treads"),
    (["run", "download", "--set", "download.threads=-1"], "download.threads"),
    (["run", "embed", "--set", "embed.phash_size=one"], "embed.phash_size"),
    (["status", "--set", "device=tpu"], "device"),
])
def test_cli_exits_2_and_writes_nothing(args, key, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--set", f"workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knnd: error: ") and key in err
    assert list(tmp_path.iterdir()) == []


def test_stage_before_its_input_exits_2(tmp_path, capsys):
    assert main(["run", "embed", "--set", f"workdir={tmp_path}"]) == 2
    assert "run `knnd run download` first" in capsys.readouterr().err
    assert not (tmp_path / "embed").exists()


def test_missing_url_list_exits_2(tmp_path, capsys):
    assert main(["run", "download", "--set", f"workdir={tmp_path}"]) == 2
    assert "download.url_list is not set" in capsys.readouterr().err
    assert main(["run", "download", "--set", f"workdir={tmp_path}", "--set", "download.url_list=nope.parquet"]) == 2
    assert "download.url_list nope.parquet does not exist" in capsys.readouterr().err
    assert not (tmp_path / "download").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: 0 steps train nothing: give at least 1"),
    (["--encoder-steps", "2.5"], "argument --encoder-steps: '2.5' is not a whole number of steps"),
    (["--steps", "10", "--minutes", "5"], "argument --minutes: not allowed with argument --steps"),
    (["--encoder-steps", "10", "--encoder-minutes", "5"], "argument --encoder-minutes: not allowed with argument --encoder-steps"),
    (["--encoder-logit-scale", "0"], "argument --encoder-logit-scale: 0: a logit scale must be above 0 (a real CLIP's is 100)"),
    (["--encoder-logit-scale", "high"], "argument --encoder-logit-scale: 'high' is not a number"),
])
def test_demo_budget_flags_are_refused_before_anything_is_written(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--workdir", str(tmp_path / "demo"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_shipped_stages_yaml_documents_every_key():
    text = open("stages.yaml").read()
    assert text == render_yaml(), "stages.yaml is out of date: regenerate it with python -c 'from pipeline.config_yaml import render_yaml; print(render_yaml(), end=\"\")' > stages.yaml"
    assert load_config("stages.yaml") == Config()
    data = yaml.safe_load(text)
    for key, _, help_text in describe():
        node = data
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) and part in node else KeyError
        assert node is not KeyError, key
        assert help_text, f"{key} has no help"
        leaf = key.split(".")[-1]
        assert re.search(rf"^\s*{leaf}: .*  # \S", text, re.M), f"{key} lacks a comment in stages.yaml"
