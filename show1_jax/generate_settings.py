"""Settings of a generation run (``configs/show1.yaml`` and ``key=value`` overrides), as frozen dataclasses."""

from __future__ import annotations

import dataclasses

STAGES = ("keyframes", "interpolation", "sr1", "sr2")


@dataclasses.dataclass(frozen=True)
class Weights:
    """Folders of the released (or converted) repositories; relative paths are taken from the working directory."""

    base: str = "show-1-base"
    interpolation: str = "show-1-interpolation"
    sr1: str = "show-1-sr1"
    first_frame: str = "IF-II-L-v1.0"
    sr2: str = "show-1-sr2"
    variant: str | None = None


# Every stage's guidance_scale may be null (None): no classifier-free guidance, the conditional prediction alone (one
# UNet pass per step instead of two; the stage's negative prompt is then unused).


@dataclasses.dataclass(frozen=True)
class Keyframes:
    num_frames: int = 8
    height: int = 40
    width: int = 64
    steps: int = 75
    guidance_scale: float | None = 9.0
    train_mode_dropout: bool = False  # the reference script's train-mode temporal dropout (SPEC.md §1.6)
    # > 0: the frames share this part of the initial noise (schedulers.frame_correlated_noise), for a base model
    # trained with diffusion.frame_noise_correlation; 0 (the reference): independent frames.
    frame_noise_correlation: float = 0.0


@dataclasses.dataclass(frozen=True)
class Interpolation:
    steps: int = 75
    guidance_scale: float | None = 4.0
    batched: bool = True
    strength: float = 1.0  # < 1: start from the keyframe blend noised part-way (stages.from_strength); 1: reference


@dataclasses.dataclass(frozen=True)
class FirstFrame:
    steps: int = 70
    guidance_scale: float | None = 4.0
    noise_level: int = 150
    strength: float = 1.0  # < 1: start from the upsampled frame noised part-way; 1: the reference


@dataclasses.dataclass(frozen=True)
class SR1:
    height: int = 160
    width: int = 256
    steps: int = 125
    guidance_scale: float | None = 7.0
    noise_level: int = 250
    window: int = 8
    stride: int = 7
    strength: float = 1.0  # < 1: start from the upsampled frames noised part-way; 1: the reference


@dataclasses.dataclass(frozen=True)
class SR2:
    height: int = 320
    width: int = 576
    steps: int = 50
    guidance_scale: float | None = 15.0
    strength: float = 0.8
    negative_prompt: str = "low resolution, blur"
    decode_chunk: int = 4


@dataclasses.dataclass(frozen=True)
class Output:
    formats: tuple[str, ...] = ("mp4", "gif")
    save_npz: bool = False
    fps: dict = dataclasses.field(default_factory=lambda: {"keyframes": 2, "interpolation": 8, "sr1": 8, "sr2": 8})


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    weights: Weights = Weights()
    dtype: str = "bfloat16"
    seed: int = 345
    negative_prompt: str = ""
    stages: tuple[str, ...] = STAGES
    keyframes: Keyframes = Keyframes()
    interpolation: Interpolation = Interpolation()
    first_frame: FirstFrame = FirstFrame()
    sr1: SR1 = SR1()
    sr2: SR2 = SR2()
    output: Output = Output()

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)} (in this order)")
        if not self.stages:
            raise ValueError("no stage to run: give at least one of " + ", ".join(STAGES))
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ValueError(f"stages must be in cascade order {list(STAGES)}, each once; got {list(self.stages)}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype `{self.dtype}`: choose float32 or bfloat16 (float64 for parity checks)")
        bad = [f for f in self.output.formats if f not in ("mp4", "gif")]
        if bad:
            raise ValueError(f"unknown output format(s) {bad}: mp4 and gif are written (npz with output.save_npz)")
        frames = interpolated_frames(self.keyframes.num_frames)
        if "sr1" in self.stages:
            sr1_windows(frames, self.sr1.window, self.sr1.stride)  # raises on counts the windows cannot cover
        for name in ("interpolation", "first_frame", "sr1", "sr2"):
            strength = getattr(self, name).strength
            if not 0 < strength <= 1:
                raise ValueError(f"{name}.strength must be in (0, 1], got {strength} (1.0 starts from pure noise)")
        if not 0 <= self.keyframes.frame_noise_correlation < 1:
            raise ValueError(
                f"keyframes.frame_noise_correlation must be in [0, 1), got {self.keyframes.frame_noise_correlation}"
                " (0: independent frames, the reference)"
            )
        for name in ("keyframes", "interpolation", "first_frame", "sr1", "sr2"):
            if getattr(self, name).steps < 1:
                raise ValueError(f"{name}.steps must be at least 1")


def interpolated_frames(num_keyframes: int) -> int:
    """Frames after interpolation: 3 new frames between consecutive keyframes (8 -> 29, SPEC.md §3.4)."""
    if num_keyframes < 2:
        raise ValueError(f"keyframes.num_frames must be at least 2 to interpolate, got {num_keyframes}")
    return 4 * (num_keyframes - 1) + 1


def sr1_windows(num_frames: int, window: int, stride: int) -> list[int]:
    """Start indices of the SR1 windows; every frame must be covered exactly as the reference does (SPEC.md §3.7)."""
    if num_frames < window or (num_frames - window) % stride:
        valid = [k for k in range(2, 17) if (interpolated_frames(k) - window) % stride == 0]
        raise ValueError(
            f"{num_frames} frames cannot be covered by SR1 windows of {window} with stride {stride} "
            f"((frames - {window}) must be a multiple of {stride}); keyframe counts that work: {valid}"
        )
    return list(range(0, num_frames - window + 1, stride))
