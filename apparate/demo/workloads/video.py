"""cv-video: torchvision's ImageNet MobileNetV2 on a fixed street camera (OpenCV's vtest.avi).

Frames go through the standard ImageNet evaluation transform: the shorter side is resized to 256
(area interpolation, aspect kept: 768x576 becomes 341x256), the centre 224x224 is cropped and
normalised with ImageNet's mean and std. Accuracy is scored against the model's own answers, so
ImageNet classes on street frames are allowed: what counts is agreement, not truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from apparate.demo.workloads import _setup
from apparate.demo.workloads._workload import Workload
from apparate.demo.workloads.mobilenet import MobileNetV2

NAME = "cv-video"
RESIZE, CROP = 256, 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_RATE_HZ = 30.0
EXAMPLE_BATCH = 8


def pretrained_mobilenet_v2() -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2 weights (top-1 about 72%), in eval mode."""
    from apparate.demo.assets import fetch

    model = MobileNetV2()
    state = torch.load(fetch("mobilenet-v2"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def video_frames() -> Tensor:
    """Every frame of vtest.avi after the ImageNet evaluation transform: (N, 3, 224, 224) float32."""
    from apparate.demo.assets import fetch
    from apparate.demo.data import read_video_frames

    path = fetch("vtest")
    height, width = read_video_frames(path, max_frames=1).shape[1:3]
    scale = RESIZE / min(height, width)
    resized = (round(height * scale), round(width * scale))
    frames = read_video_frames(path, size=resized)
    top, left = (resized[0] - CROP) // 2, (resized[1] - CROP) // 2
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = torch.empty((len(frames), 3, CROP, CROP), dtype=torch.float32)
    chunk = 64  # bounds the float temporaries; the whole video is 480 MB as float32
    for start in range(0, len(frames), chunk):
        crop = frames[start:start + chunk, top:top + CROP, left:left + CROP]
        out[start:start + chunk] = (crop.permute(0, 3, 1, 2).to(torch.float32) / 255 - mean) / std
    return out


def load_video_workload(progress: bool = True) -> Workload:
    del progress  # nothing here is slow enough to report on: decoding takes seconds
    frames = video_frames()
    ramp_count = _setup.ramp_train_count(len(frames))
    return Workload(
        name=NAME,
        model=pretrained_mobilenet_v2(),
        train_inputs=(frames[:ramp_count],),
        stream_inputs=(frames[ramp_count:],),
        example_inputs=(frames[:EXAMPLE_BATCH].clone(),),
        arrival="fixed-rate",
        rate_hz=FRAME_RATE_HZ,
        description=(
            f"OpenCV's vtest.avi ({len(frames)} frames of a fixed camera over a pedestrian "
            f"street) through torchvision's ImageNet MobileNetV2; frames resized to {RESIZE} on "
            f"the shorter side, centre-cropped to {CROP}x{CROP}, ImageNet-normalised. Ramps "
            f"train on the first {ramp_count} frames; the other {len(frames) - ramp_count} "
            f"arrive at a fixed {FRAME_RATE_HZ:g} frames per second (the camera recorded 10)."),
    )
