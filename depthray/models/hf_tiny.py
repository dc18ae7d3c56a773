"""Random-weight transformers depth checkpoints in the published layout (config.json,
model.safetensors, preprocessor_config.json), built offline with transformers' own config
classes: the conformance tests run depthray and upstream on the same tiny networks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def _dinov2(**extra):
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, **extra)


def _positive_output(conv: torch.nn.Conv2d) -> None:
    """Make the head's last convolution non-negative: its input is a ReLU's output, so the
    map it produces is positive wherever any channel is active. A trained head predicts
    positive (inverse) depth; a random one would leave most pixels at its final ReLU's 0, a
    plateau that dominates any comparison (and is depth 1e4 after Depth Pro's clamp)."""
    with torch.no_grad():
        conv.weight.abs_()
        conv.bias.zero_()


def _standardise_output(net: torch.nn.Module, conv: torch.nn.Conv2d, size: int) -> None:
    """Rescale the convolution before a sigmoid head so its output has mean 0 and std 1 on a
    random image: at random init it is ~1e-6, where the sigmoid is flat and float32 holds a
    few levels of it; a trained head spans the sigmoid's range."""
    seen = []
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        net.eval()(pixel_values=torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
        handle.remove()
        mean, std = seen[0].mean(), seen[0].std()
        conv.weight.div_(std)
        conv.bias.sub_(mean).div_(std)


def _save(net: torch.nn.Module, out_dir: str | os.PathLike, preprocessor: dict) -> Path:
    out = Path(out_dir)
    net.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


def build_tiny_depth_anything(out_dir: str | os.PathLike, seed: int = 0, size: int = 56,
                              metric: bool = False) -> Path:
    """Depth Anything V2 (relative, or metric: sigmoid x max_depth head) with its published
    processor settings: keep aspect ratio, multiples of 14, bicubic."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

    torch.manual_seed(seed)
    backbone = _dinov2(patch_size=14, image_size=size, reshape_hidden_states=False,
                       out_features=["stage1", "stage2", "stage3", "stage4"])
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
                                 depth_estimation_type="metric" if metric else "relative", max_depth=20)
    preprocessor = {"image_processor_type": "DPTImageProcessor", "do_resize": True, "keep_aspect_ratio": True,
                    "ensure_multiple_of": 14, "size": {"height": size, "width": size}, "resample": 3,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, **_IMAGENET,
                    "do_pad": False}
    net = DepthAnythingForDepthEstimation(config)
    if metric:
        _standardise_output(net, net.head.conv3, size)
    else:
        _positive_output(net.head.conv3)
    return _save(net, out_dir, preprocessor)


def build_tiny_dpt(out_dir: str | os.PathLike, seed: int = 0, size: int = 64) -> Path:
    """DPT (ViT backbone, MiDaS-style relative head) with a fixed square input and bilinear
    resampling, the other setting of DPT's processor (aspect ratio not kept). Patches of 16
    and reassemble factors 4..0.5 as published, so the head's output has the input's size."""
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=size, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    preprocessor = {"image_processor_type": "DPTImageProcessor", "do_resize": True, "keep_aspect_ratio": False,
                    "ensure_multiple_of": 1, "size": {"height": size, "width": size}, "resample": 2,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    net = DPTForDepthEstimation(config)
    _positive_output(net.head.head[4])
    return _save(net, out_dir, preprocessor)


def build_tiny_depth_pro(out_dir: str | os.PathLike, seed: int = 0, size: int = 128) -> Path:
    """Depth Pro with its field-of-view head (so W/f comes from the network, as in the
    published checkpoint), processor at a fixed size, bilinear."""
    from transformers import DepthProConfig, DepthProForDepthEstimation

    torch.manual_seed(seed)
    # Encoder patches of 16 pixels as published, so the output has the input's size
    encoder = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                   intermediate_size=64, patch_size=16, image_size=size // 4)
    config = DepthProConfig(patch_size=size // 4, fusion_hidden_size=16, intermediate_hook_ids=[3, 1],
                            intermediate_feature_dims=[16, 16], scaled_images_ratios=[0.25, 0.5, 1],
                            scaled_images_overlap_ratios=[0.0, 0.5, 0.25], scaled_images_feature_dims=[32, 32, 16],
                            use_fov_model=True, num_fov_head_layers=2, image_model_config=dict(encoder),
                            patch_model_config=dict(encoder), fov_model_config=dict(encoder))
    net = DepthProForDepthEstimation(config)
    _positive_output(net.head.layers[4])
    with torch.no_grad():  # a plausible field of view (degrees), as a trained head predicts: W/f > 0
        net.fov_model.head.layers[-1].bias.fill_(60.0)
    preprocessor = {"image_processor_type": "DepthProImageProcessorFast", "do_resize": True,
                    "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return _save(net, out_dir, preprocessor)
