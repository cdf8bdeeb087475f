"""`model.pretrained: imagenet`: the encoder's published weights through the Hugging Face
hub cache, offline. Each test lays out a hub cache itself (generated weights in the
layout `huggingface_hub` reads: models--<org>--<name>/refs/main + snapshots/<rev>/<file>)
and builds the student in a fresh process with HF_HOME / HF_HUB_OFFLINE set, since
huggingface_hub reads them when it is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dakd.config import SarossModelConfig
from dakd.errors import ConfigError
from dakd.models.encoders import published_weights

REVISION = "0123456789abcdef0123456789abcdef01234567"

BUILD = """
import json, sys, torch
from dakd.config import SarossModelConfig
from dakd.models.saross import build_student
from dakd.errors import ConfigError
try:
    model = build_student(SarossModelConfig(encoder=sys.argv[1], pretrained="imagenet",
                                            decoder_channels=[8, 8, 8], caft_heads=2), 2)
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
torch.save({k: v for k, v in model.encoder.state_dict().items()}, sys.argv[2])
print(json.dumps({"ok": True}))
"""


def lay_out_hub_cache(hf_home: Path, repo: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """Write `state` as `filename` of hub `repo` into the cache under hf_home; returns the file."""
    from safetensors.torch import save_file

    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    path = snapshot / filename
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def build_offline(encoder: str, hf_home: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", BUILD, encoder, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_imagenet_weights_load_from_a_hub_cache_offline(tmp_path):
    import timm

    repo, files, _ = published_weights("resnet18")
    torch.manual_seed(0)
    published = timm.create_model("resnet18", pretrained=False).state_dict()  # the classification model's keys
    published = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in published.items()}
    lay_out_hub_cache(tmp_path / "hf", repo, files[0], published)
    result = build_offline("resnet18", tmp_path / "hf", tmp_path / "encoder.pt")
    assert result == {"ok": True}
    loaded = torch.load(tmp_path / "encoder.pt", weights_only=True)
    # the RGB stem summed into the one SAR channel (timm's adapt_input_conv), the rest as published
    assert torch.allclose(loaded["model.conv1.weight"], published["conv1.weight"].sum(1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "layer3.0.downsample.0.weight"):
        assert torch.equal(loaded[f"model.{key}"], published[key]), key
    assert not any(k.startswith("model.fc.") for k in loaded)  # the classifier is dropped


def test_imagenet_offline_without_a_cached_copy_says_which_file_to_place_where(tmp_path):
    result = build_offline("resnet18", tmp_path / "empty-hf", tmp_path / "unused.pt")
    msg = result["error"]
    assert msg.startswith("model.pretrained=imagenet")
    assert "timm/resnet18" in msg and "model.safetensors" in msg and "HF_HUB_OFFLINE" in msg
    assert str(tmp_path / "empty-hf" / "hub" / "models--timm--resnet18") in msg
    assert not (tmp_path / "unused.pt").exists()


def test_imagenet_for_an_encoder_without_published_weights_is_refused():
    with pytest.raises(ConfigError, match=r"model.pretrained=imagenet: timm encoder 'cspresnet50d' has no published"):
        published_weights("cspresnet50d")


def test_mambavision_published_weights_come_from_nvidias_hub_repos():
    from dakd.models.encoders import mambavision_names

    assert "mambavision_b" in mambavision_names()  # installed by `make venv`
    assert published_weights("mambavision_b") == ("nvidia/MambaVision-B-1K", ["mambavision_base_1k.pth.tar"], "main")
    assert published_weights("mambavision_t")[0] == "nvidia/MambaVision-T-1K"


def test_weights_of_another_architecture_name_the_setting(tmp_path):
    import timm
    from safetensors.torch import save_file

    from dakd.models.saross import build_student

    path = tmp_path / "resnet34.safetensors"
    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), str(path))
    with pytest.raises(ConfigError, match=r"model.pretrained: weights .*resnet34.safetensors do not fit the encoder"):
        build_student(SarossModelConfig(encoder="resnet18", pretrained=str(path), decoder_channels=[8, 8, 8]), 2)


def test_pretrained_imagenet_is_kept_as_a_keyword_and_paths_become_absolute():
    assert SarossModelConfig(pretrained="imagenet").pretrained == "imagenet"
    assert SarossModelConfig(pretrained="w.safetensors").pretrained == os.path.abspath("w.safetensors")
