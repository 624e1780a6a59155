import pytest
import torch
import torch.nn.functional as F

from clipkit.conv_stem import ConvStem, apply_conv_stem
from clipkit.models import SCRATCH, load_model, save_checkpoint


def test_stem_maps_an_image_to_the_patch_grid_of_the_transformer_width():
    stem = ConvStem([8, 16, 32], width=48, patch_size=8)
    assert stem(torch.zeros(2, 3, 64, 64)).shape == (2, 48, 8, 8)
    assert stem(torch.zeros(1, 3, 32, 32)).shape == (1, 48, 4, 4)
    with pytest.raises(ValueError, match="factor of two"):
        ConvStem([8, 16], width=48, patch_size=8)
    with pytest.raises(ValueError, match="factor of two"):
        ConvStem([8, 16, 32], width=48, patch_size=12)


def test_the_demo_config_builds_its_stem_and_encodes_as_open_clip_does(tmp_path):
    model = load_model("clipkit-demo", SCRATCH, device="cpu")
    assert isinstance(model.clip.visual.conv1, ConvStem)
    assert load_model("clipkit-demo", SCRATCH, device="cpu").fingerprint == model.fingerprint  # fixed-seed init
    pixels = torch.randn(3, 3, model.image_size, model.image_size)
    with torch.no_grad():
        reference = F.normalize(model.clip.encode_image(pixels), dim=-1)
    torch.testing.assert_close(model.encode_image(pixels), reference)

    save_checkpoint(model, tmp_path / "m.pt")
    again = load_model("clipkit-demo", tmp_path / "m.pt", device="cpu")
    assert again.fingerprint == model.fingerprint
    torch.testing.assert_close(again.encode_image(pixels), reference)


def test_the_stem_learns_with_the_tower():
    clip = load_model("clipkit-demo", SCRATCH, device="cpu").clip.train()
    clip.encode_image(torch.randn(2, 3, 64, 64)).square().sum().backward()
    first = clip.visual.conv1[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_a_stem_is_refused_for_a_resnet_tower():
    clip = load_model("clipkit-tiny-rn", SCRATCH, device="cpu").clip
    with pytest.raises(ValueError, match="VisionTransformer"):
        apply_conv_stem(clip, [8, 16, 32])
