"""Configuration: YAML round trip, overrides, clear errors, stage hashes, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from openqpm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_names,
    config_to_dict,
    demo_config,
    load_config,
    parse_override,
    save_config,
)
from openqpm.stages import stage_hash

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "openqpm" / "configs"


def test_defaults_are_the_paper_recipe() -> None:
    cfg = RunConfig()
    assert (cfg.solver.n_features, cfg.solver.n_per_class) == (50, 5)
    assert cfg.dense.epochs == 150 and cfg.dense.lr_backbone == 5e-3 and cfg.dense.lr_head == 1e-2
    assert cfg.finetune.epochs == 40 and cfg.finetune.lr_backbone == 1e-4
    assert cfg.finetune.momentum == 0.95
    assert abs(cfg.solver.bias_strength - 10**-0.5) < 1e-12


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(RunConfig(), ["solver.n_features=40", "model.weights=/x/w.pth"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_overrides_parse_types() -> None:
    cfg = apply_overrides(
        RunConfig(), ["dense.epochs=3", "data.crop=false", "model.weights=null", "seed=7"]
    )
    assert cfg.dense.epochs == 3 and cfg.data.crop is False and cfg.seed == 7
    assert cfg.model.weights is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("solver.n_featurez=3", "solver.n_featurez"),
        ("dense.epochs=many", "dense.epochs"),
        ("data.crop=maybe", "data.crop"),
        ("nothing", "key=value"),
        ("solver.n_features=2", "n_features must be >= solver.n_per_class"),
        ("finetune.lr_head=-1", "finetune.lr_head"),
        ("solver.time_limit_s=inf", "solver.time_limit_s"),
        ("solver=3", "is a section"),
    ],
)
def test_bad_overrides_name_the_field(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        apply_overrides(RunConfig(), [override])


def test_bad_file_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("solver:\n  n_feature: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value) and "n_feature" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_stage_hash_tracks_exactly_its_inputs() -> None:
    base = RunConfig()
    changed_nf = apply_overrides(base, ["solver.n_features=40"])
    # n_features changes the problem and everything after it, never the dense model.
    assert stage_hash(base, "dense") == stage_hash(changed_nf, "dense")
    assert stage_hash(base, "features") == stage_hash(changed_nf, "features")
    for stage in ("problem", "assignment", "finetune", "evaluate", "report"):
        assert stage_hash(base, stage) != stage_hash(changed_nf, stage)
    # speed-only settings never invalidate work
    fast = apply_overrides(base, ["data.num_workers=0", "device=cpu", "amp=false"])
    assert all(stage_hash(base, s) == stage_hash(fast, s) for s in ("dense", "report"))
    # the seed changes training and the solve
    seeded = apply_overrides(base, ["seed=3"])
    assert stage_hash(base, "dense") != stage_hash(seeded, "dense")
    # the fine-tuning schedule does not change the assignment
    ft = apply_overrides(base, ["finetune.epochs=3"])
    assert stage_hash(base, "assignment") == stage_hash(ft, "assignment")
    assert stage_hash(base, "finetune") != stage_hash(ft, "finetune")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.solver.n_per_class >= 1


def test_demo_config_is_the_shipped_demo_yaml() -> None:
    loaded = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    assert loaded == config_to_dict(demo_config())
    assert demo_config().model.arch == "small_cnn"


def test_shipped_configs_load_by_name_and_unknown_names_list_them(tmp_path: Path) -> None:
    assert {"cub_resnet50", "demo", "imagenet_resnet50"} <= set(config_names())
    assert load_config("cub_resnet50") == load_config(CONFIG_DIR / "cub_resnet50.yaml")
    with pytest.raises(ConfigError, match="cub_resnet50"):
        load_config("cub_resnet5")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nothing.yaml")


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        # text fields keep the text as written: YAML would read these as false and 202401
        ("data.root=no", "data.root", "no"),
        ("data.root=2024_01", "data.root", "2024_01"),
        ("model.weights=null", "model.weights", None),
        ("solver.n_features=40", "solver.n_features", 40),
        ("data.crop=false", "data.crop", False),
    ],
)
def test_set_overrides_are_typed_by_their_field(text: str, key: str, value: object) -> None:
    assert parse_override(text) == (key, value)


def test_typed_overrides_round_trip_into_config_yaml(tmp_path: Path) -> None:
    for root in ("no", "2024_01", "01", "null-ish"):
        config = apply_overrides(RunConfig(), {"data.root": root, "solver.n_features": 12})
        save_config(config, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml").data.root == root
        assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["root"] == root


def test_mapping_overrides_check_types_and_keys() -> None:
    config = apply_overrides(RunConfig(), {"solver": {"n_features": 30, "method": "search"}})
    assert (config.solver.n_features, config.solver.method) == (30, "search")
    with pytest.raises(ConfigError, match="data.root"):
        apply_overrides(RunConfig(), {"data.root": 5})
    with pytest.raises(ConfigError, match="solver.n_featurez"):
        apply_overrides(RunConfig(), {"solver.n_featurez": 5})
    with pytest.raises(ConfigError, match="quote it"):
        apply_overrides(RunConfig(), {"data.dataset": False})


def test_non_utf8_config_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  root: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_configuration_trains_in_fp32(name: str) -> None:
    assert RunConfig().amp is False  # the paper trains in fp32
    assert load_config(name).amp is False


def test_crop_defaults_to_the_data_set_s_own_setting() -> None:
    from openqpm.data._registry import resolved_crop

    assert RunConfig().data.crop is None
    # the paper crops only the birds (and the synthetic set is made like them)
    expected = {
        "cub": True,
        "travelingbirds": True,
        "synthetic": True,
        "cars": False,
        "aircraft": False,
        "imagenet": False,
        "imagefolder": False,
    }
    assert {name: resolved_crop(name, None) for name in expected} == expected
    assert resolved_crop("cub", False) is False and resolved_crop("cars", True) is True
    # hashes read the value as written: null and true are two configurations
    cropped = apply_overrides(RunConfig(), ["data.crop=true"])
    assert stage_hash(RunConfig(), "dense") != stage_hash(cropped, "dense")
    assert apply_overrides(cropped, ["data.crop=null"]).data.crop is None


def test_the_imagenet_configuration_is_the_paper_s_recipe() -> None:
    config = load_config("imagenet_resnet50")
    assert config.dense.skip and config.model.reduced_strides is False
    assert config.data.augment == "imagenet" and config.data.batch_size == 64
    assert config.finetune.lr_backbone == pytest.approx(
        load_config("cub_resnet50").finetune.lr_backbone / 100
    )
