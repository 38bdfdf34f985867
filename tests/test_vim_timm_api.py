"""CPU tests of the Vim model as a timm and pip citizen (issue 27): factory kwargs and the meta device, any
input size, forward_intermediates / prune contracts, classifier and input-size resets, torch.fx tracing,
pretrained loading (in_chans, offline), packaging and the CPU-only setup."""
import os
import pathlib
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import timm

import vim_reference as ref
from vim.models_mamba import resample_pos_embed
from helpers import assert_max_error as assert_close, put_in_hf_cache
from test_vim_model import ATOL, RTOL, perturb, save_trainer_checkpoint, small

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_factory_kwargs_and_meta_device():
    model = timm.create_model("vim_small_patch16_224", device="meta")
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"meta"}
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_patch16_224", drop_path_rate=0.1)
    assert model.pos_embed.is_meta and model.layers[-1].drop_path.drop_prob == pytest.approx(0.1 * 22 / 23)  # [0] + linspace(0, .1, 24)
    model = small(depth=2, dim=16, dtype=torch.float64)
    assert model.head.weight.dtype == model.pos_embed.dtype == model.layers[0].mixer.in_proj.weight.dtype \
        == torch.float64


def test_head_hidden_size_in_chans_and_reset_classifier_on_model_device_dtype():
    model = small(depth=1, dim=24, in_chans=1).double()
    assert model.head_hidden_size == model.num_features == 24 and model.in_chans == 1
    model.eval().reset_classifier(7)
    assert model.head.weight.dtype == torch.float64 and model.head.out_features == 7 and not model.head.training
    model.to("meta")
    model.reset_classifier(3)
    assert model.head.weight.is_meta


def test_set_input_size_keeps_a_frozen_pos_embed_frozen():
    model = small(img=48)
    model.requires_grad_(False)
    model.set_input_size(img_size=(64, 80))
    assert model.pos_embed.shape == (1, 4 * 5 + 1, 32)
    assert not any(p.requires_grad for p in model.parameters())


def test_cfg_fixed_input_size_false_means_any_size_works():
    assert timm.get_pretrained_cfg_value("vim_tiny_patch16_224", "fixed_input_size") is False
    model = perturb(small(img=48, depth=2, dim=16)).double().eval()
    x = torch.randn(1, 3, 64, 32, dtype=torch.float64)  # not the built size, not square
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (4, 2), (3, 3))  # tested in test_vim_model.py
    with torch.no_grad():
        out = model(x)
    assert_close(out, ref.vim_forward(sd, x, 16)["logits"], RTOL, ATOL, "any size")


def test_forward_intermediates_none_takes_every_block():
    model = perturb(small(img=32, depth=3, dim=16)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        expected = ref.vim_forward({k: v.detach() for k, v in model.state_dict().items()}, x, 16)
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    c = expected["cls_index"]
    assert len(inter) == 3
    for i, f in enumerate(inter):
        s = expected["streams"][i]
        want = torch.cat([s[:, :c], s[:, c + 1:]], 1).transpose(1, 2).reshape(2, 16, 2, 2)
        assert_close(f, want, RTOL, ATOL, f"block {i}")
    # stop_early returns the final norm of the stream where it stopped (timm's ViT contract).
    assert_close(early[0], inter[1], 0, 0, "stop_early tap")
    assert_close(early_final, ref.rms_norm(expected["streams"][1], model.norm_f.weight.detach()), RTOL, ATOL,
                 "stop_early final")


def test_prune_norm_features_end_at_the_tap():
    model = perturb(small(img=32, depth=3, dim=16)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
        assert model.prune_intermediate_layers([1], prune_norm=True) == [1]
        features = model.forward_features(x)
    assert len(model.layers) == 2 and model.num_classes == 0
    c = features.shape[1] // 2
    torch.testing.assert_close(torch.cat([features[:, :c], features[:, c + 1:]], 1), taps[1])


def test_fx_feature_extraction_matches_eager():
    from timm.models import create_feature_extractor

    model = perturb(small(img=48, depth=2, dim=16)).eval()
    fx = create_feature_extractor(model, return_nodes={"head": "logits"})
    x = torch.randn(2, 3, 32, 64)  # another size than the built one: no shape branches baked into the graph
    with torch.no_grad():
        out = fx(x)
        torch.testing.assert_close(out["logits"], model(x))


def test_pretrained_file_with_other_in_chans(tmp_path):
    source = perturb(small(img=32, depth=1, dim=16))
    path = tmp_path / "ckpt.pth"
    save_trainer_checkpoint(path, source.state_dict())
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, in_chans=1, num_classes=10, depth=1,
                              embed_dim=16, img_size=32, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.head.weight, source.head.weight)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pretrained_without_network_fails_fast_naming_the_offline_route(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"pretrained_cfg_overlay=dict\(file=.*HF_HUB_OFFLINE"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True, depth=1)
    assert time.monotonic() - start < 5


def test_pretrained_from_the_hf_cache_needs_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    source = perturb(small(img=224, depth=1, dim=16, num_classes=1000))
    put_in_hf_cache(tmp_path, "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth",
                    lambda path: save_trainer_checkpoint(path, source.state_dict()))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, depth=1, embed_dim=16)
    torch.testing.assert_close(model.pos_embed, source.pos_embed)


def test_wheel_installs_only_the_vim_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vim/models_mamba.py" in names and "vim/__init__.py" in names
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"vim"}, top


def _run_setup(tmp_path, env_extra, nvidia_smi):
    """scripts/setup.sh with `python` replaced by a stub without torch that logs its pip calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    (bin_dir / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = -c ]; then exit 1; fi\necho "$@" >> {log}\n'
        'case "$*" in *--index-url*) [ -z "$UNREACHABLE_INDEX" ] || exit 1;; esac\n')
    (bin_dir / "python").chmod(0o755)
    if nvidia_smi:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VIM_TORCH_INDEX_URL"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", **env_extra)
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, check=True)
    return log.read_text().splitlines()


@pytest.mark.parametrize("env,nvidia_smi,index", [
    ({}, False, "https://download.pytorch.org/whl/cpu"),
    ({"VIM_TORCH_INDEX_URL": "https://mirror.example/cpu"}, False, "https://mirror.example/cpu"),
    ({"VIM_TORCH_INDEX_URL": ""}, False, None),
    ({}, True, None),
])
def test_setup_takes_cpu_torch_wheels_without_a_gpu(tmp_path, env, nvidia_smi, index):
    calls = _run_setup(tmp_path, env, nvidia_smi)
    torch_calls = [c for c in calls if "--index-url" in c]
    if index is None:
        assert not torch_calls
    else:
        assert torch_calls == [f"-m pip install -q --index-url {index} torch>=2.6 torchvision>=0.21"]
    assert calls[-1].endswith("-e causal-conv1d -e mamba-1p1p1 -e .")


def test_setup_falls_back_to_the_default_index_when_the_cpu_index_is_unreachable(tmp_path):
    calls = _run_setup(tmp_path, {"UNREACHABLE_INDEX": "1"}, nvidia_smi=False)
    assert calls[0].startswith("-m pip install -q --index-url https://download.pytorch.org/whl/cpu")
    assert "-m pip install -q -r vim_requirements.txt" in calls[1:]  # torch then comes from the default index
    assert calls[-1].endswith("-e causal-conv1d -e mamba-1p1p1 -e .")
