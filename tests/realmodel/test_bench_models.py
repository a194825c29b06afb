"""``seamline bench SCENARIO --model``: the named real model, folders, hub ids and the codec's --splits."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from seamline.bench import models
from seamline.bench.cli import add_arguments


def test_smollm2_is_the_test_tiers_checkpoint(smol_checkpoint):
    """``--model smollm2-135m`` fetches and converts the same cache entries as the real-model fixture."""
    assert Path(models.checkpoint(models.SMOLLM2)) == Path(smol_checkpoint)
    assert models.slug(models.SMOLLM2) == "smollm2-135m"


def test_folders_hub_ids_and_errors(minilm_path, tmp_path):
    assert Path(models.checkpoint(str(minilm_path))) == minilm_path.resolve()
    assert models.checkpoint("demo") == "demo"
    folder = models.slug(str(minilm_path))
    assert folder.startswith("model-") and "/" not in folder
    hub = models.slug("HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert hub.startswith("SmolLM2-135M-Instruct-main-") and "/" not in hub and "@" not in hub
    assert models.slug(str(minilm_path)) != models.slug(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        models.checkpoint(str(tmp_path / "missing"))


def test_splits_argument():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["codec", "--model", "smollm2-135m", "--splits", "28,2,14"])
    assert args.model == "smollm2-135m" and args.splits == [2, 14, 28]
    with pytest.raises(SystemExit):
        p.parse_args(["codec", "--splits", "0,x"])


def test_codecs_argument(capsys):
    """``--codecs`` measures a subset of the registry; an unknown name is refused with the known ones listed."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["codec", "--codecs", "rice10,rice8,rice10"])
    assert args.codecs == ["rice10", "rice8"]
    assert p.parse_args(["codec"]).codecs is None
    with pytest.raises(SystemExit):
        p.parse_args(["codec", "--codecs", "rice8,int3"])
    err = capsys.readouterr().err
    assert "int3" in err and "rice10" in err


def test_codec_configs_keep_the_codecs_asked_for():
    from seamline.bench.codec import codec_configs
    from seamline.protos.codec import CODEC_NAMES

    calib = {"rot_outlier_channels": [1, 5], "int4_outlier_channels": [1, 5], "outlier_channels": [1],
             "channel_order": list(range(64))}
    assert list(codec_configs(calib, 64, ["rice10", "fp16"])) == ["rice10", "fp16"]
    assert list(codec_configs(calib, 64)) == list(CODEC_NAMES)
