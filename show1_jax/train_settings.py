"""Settings of a training run (``configs/train_*.yaml`` plus ``key=value`` overrides), as frozen dataclasses.

Read with ``show1_jax.settings.load_settings(TrainSettings, path, overrides)``; the nesting of the YAML mirrors the
dataclasses below. SPEC.md §9 says what is known about how Show-1 was trained (little: no training code was
released); every value here is a choice of ours unless its comment cites the spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

STAGES = ("keyframes", "interpolation", "first_frame", "sr1", "sr2", "vae")
UNET_STAGES = ("keyframes", "interpolation", "first_frame", "sr1", "sr2")
TRAINABLE = ("all", "temporal", "temporal_attention", "decoder")
LR_SCHEDULES = ("constant", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
RECONSTRUCTION_LOSSES = ("l1", "mse")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Where the trained model (and SR2's frozen VAE) come from.

    ``pretrained``: a component folder, released or converted (``show-1-base/unet``; stage ``vae``: a ``vae/``
    folder); finetuning starts there. Otherwise ``config`` builds a randomly initialised model seeded by ``seed``: a
    tiny preset (``tiny_base``, ``tiny_interpolation``, ``tiny_if2``, ``tiny_sr1``, ``tiny_sr2``, ``tiny_vae``:
    ``show1_jax.tiny``) or the path of a ``config.json`` (a UNet's; stage ``first_frame``: a 2D
    ``UNet2DConditionModel``'s; stage ``vae``: an ``AutoencoderKL``'s).
    ``remat``: recompute each down/mid/up block of a UNet in the backward pass (activation memory ~ one block instead
    of the whole UNet, for ~30% more compute). ``temporal_conv_dropout``: the reference's train-mode Dropout(0.1) in
    every TemporalConvLayer (SPEC.md §1.6), on by default in training as in a torch ``model.train()``.
    ``vae``: SR2 only, its frozen VAE: a ``vae/`` folder (e.g. ``<workdir>/vae`` of a stage-``vae`` run) or ``tiny``
    (a random ``TINY_VAE`` seeded by ``vae_seed``); default: the ``vae`` folder next to ``pretrained``.
    ``config_overrides``: config fields replaced in the pretrained model's (or the preset's) config, e.g.
    ``{temporal_position_embedding: sinusoidal}`` to give a trained UNet the parameter-free frame code; a change
    of any parameter's shape is refused by the loader, naming the keys.
    """

    pretrained: str | None = None
    config: str | None = None
    seed: int = 0
    dtype: str = "float32"
    remat: bool = False
    temporal_conv_dropout: bool = True
    vae: str | None = None
    vae_seed: int = 0
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.pretrained is None) == (self.config is None):
            raise ValueError(
                "set exactly one of model.pretrained (a unet/ or vae/ folder to finetune) or model.config (a tiny"
                " preset such as tiny_base or tiny_vae, or a config.json, to train from scratch)"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype `{self.dtype}`: choose float32 (recommended for AdamW) or bfloat16")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """The denoising objective (see the module docstring of ``show1_jax.train`` for the choices).

    ``scheduler``: a ``scheduler_config.json`` (or its folder) giving the training noise schedule; default: the
    ``scheduler`` folder next to ``model.pretrained``, else the stage's released config (SPEC.md §4.1; first_frame:
    IF-II-L's learned-range DDPM, §4.5; sr2: §4.6).
    ``prediction_type``: ``epsilon`` or ``v_prediction``; default: the scheduler's. Timesteps are drawn uniformly
    from [min_timestep, max_timestep] (inclusive; default max: the last training timestep, SR2: 900 as its model card
    says, SPEC.md §9). ``learned_variance_weight``: weight of the learned-variance (VLB) term on 6-channel pixel
    UNets; 0 trains the ε channels only. ``cfg_dropout``: probability that a sample's text embedding is replaced by
    the empty prompt's (classifier-free guidance training). ``num_frames``: frames per training clip, cut at a random
    offset from the dataset's clips; default: the dataset's clip length (interpolation: 5, SPEC.md §3.4).
    ``frame_noise_correlation`` (keyframes only): > 0 trains with noise whose frames share that part
    (``schedulers.frame_correlated_noise``, PYoCo's mixed prior); sample the model with the same
    ``keyframes.frame_noise_correlation``. 0 (default): independent noise, as the released models were trained.
    """

    scheduler: str | None = None
    prediction_type: str | None = None
    min_timestep: int = 0
    max_timestep: int | None = None
    learned_variance_weight: float = 1.0
    cfg_dropout: float = 0.1
    num_frames: int | None = None
    frame_noise_correlation: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.frame_noise_correlation < 1.0:
            raise ValueError(
                f"diffusion.frame_noise_correlation must be in [0, 1), got {self.frame_noise_correlation}"
                " (0: independent noise per frame)"
            )
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"diffusion.prediction_type must be one of {PREDICTION_TYPES} or null (the scheduler's)")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"diffusion.cfg_dropout is a probability, got {self.cfg_dropout}")
        if self.learned_variance_weight < 0:
            raise ValueError("diffusion.learned_variance_weight must be >= 0 (0 switches the VLB term off)")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep < self.min_timestep):
            raise ValueError(
                f"diffusion timestep range [{self.min_timestep}, {self.max_timestep}] is empty or negative"
            )


@dataclasses.dataclass(frozen=True)
class LowResSettings:
    """How a super-resolution UNet's conditioning is made from high-resolution training frames (SPEC.md §3.5, §9).

    The frames are downsampled by ``low_res_factor`` (antialiased bilinear), upsampled back bilinearly with
    ``align_corners=True`` as at inference, and noised by the image-noising scheduler (``noising_scheduler``, default
    the ``image_noising_scheduler`` folder beside ``model.pretrained``, else the released cosine DDPM, SPEC.md §4.5)
    at a level drawn uniformly from [noise_level_min, noise_level_max] that is also the UNet's ``class_labels``.
    Shared by the stages ``first_frame`` (IF-II-L, one frame) and ``sr1`` (clips; :class:`SR1Settings`).
    """

    section: ClassVar[str] = "low_res"
    low_res_factor: int = 4
    noise_level_min: int = 0
    noise_level_max: int = 999
    noising_scheduler: str | None = None

    def __post_init__(self):
        if self.low_res_factor < 1:
            raise ValueError(f"{self.section}.low_res_factor must be >= 1 (4 for 40x64 -> 160x256)")
        if not 0 <= self.noise_level_min <= self.noise_level_max:
            raise ValueError(
                f"{self.section} noise-level range [{self.noise_level_min}, {self.noise_level_max}] is empty"
            )


@dataclasses.dataclass(frozen=True)
class FirstFrameSettings(LowResSettings):
    """IF-II-L's conditioning (stage ``first_frame``): one random frame of each clip as the high-res target, its
    downsampled, upsampled and noised copy as the condition (:class:`LowResSettings`), as ``stages.first_frame_sr``
    builds it at inference from the interpolated 40x64 frame 0 (SPEC.md §3.5 3a)."""

    section: ClassVar[str] = "first_frame"


@dataclasses.dataclass(frozen=True)
class SR1Settings(LowResSettings):
    """SR1's conditioning (:class:`LowResSettings` on whole clips, SPEC.md §3.5 3b); then, with probability
    ``first_frame_cond_prob``, conditioning frame 0 is replaced by the clean high-resolution frame 0, as the
    inference pipeline does with ``first_frame_cond``.
    """

    section: ClassVar[str] = "sr1"
    first_frame_cond_prob: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.first_frame_cond_prob <= 1.0:
            raise ValueError("sr1.first_frame_cond_prob is a probability")


@dataclasses.dataclass(frozen=True)
class VAESettings:
    """The autoencoder objective (stage ``vae``; see ``show1_jax.train``'s module docstring).

    Each step encodes one random frame of each clip, decodes a posterior sample and minimises
    ``reconstruction + kl_weight * KL`` per image, both summed over the image (SD's LPIPSWithDiscriminator
    weighting, so ``kl_weight`` = 1e-6 means what it meant for SD's KL-f8) and then divided by the number of pixel
    values. ``reconstruction_loss``: ``l1`` (SD's choice; sharper than ``mse`` without a perceptual term) or ``mse``.
    No perceptual (LPIPS) or adversarial term: reconstructions are blurrier than SD's VAE.
    ``fit_scaling_factor``: at export, set the config's ``scaling_factor`` to 1 / std of posterior samples of every
    frame of the first training batch (as SD did), so SR2 sees unit-variance latents; false keeps the config's
    (finetuning a VAE that a latent UNet was trained with).

    ``degrade_prob``: the probability that an image is *encoded* degraded as a latent upsampler's input is (reduced
    by ``degrade_factor`` with an antialiased linear filter, brought back by bicubic resizing, then blurred by a
    Gaussian of standard deviation uniform in [0, ``degrade_blur``] pixels, then its chroma scaled about its luma by
    a factor uniform in [1 - ``degrade_saturation``, 1]) while the loss still compares the decoding with the clean
    image: with ``optim.trainable=decoder`` the decoder learns to restore the colours and edges that an upsampled,
    blurry, duller video's latents lose. 0 (default): plain reconstruction.
    """

    kl_weight: float = 1e-6
    reconstruction_loss: str = "l1"
    fit_scaling_factor: bool = True
    degrade_prob: float = 0.0
    degrade_factor: int = 2
    degrade_blur: float = 0.0
    degrade_saturation: float = 0.0

    def __post_init__(self):
        if self.kl_weight < 0:
            raise ValueError(f"vae.kl_weight must be >= 0 (SD: 1e-6), got {self.kl_weight}")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"vae.reconstruction_loss `{self.reconstruction_loss}`: choose one of {RECONSTRUCTION_LOSSES}"
            )
        if not 0.0 <= self.degrade_prob <= 1.0:
            raise ValueError(f"vae.degrade_prob is a probability, got {self.degrade_prob}")
        if self.degrade_factor < 1:
            raise ValueError(f"vae.degrade_factor must be >= 1 (1: no resizing), got {self.degrade_factor}")
        if self.degrade_blur < 0:
            raise ValueError(f"vae.degrade_blur is a standard deviation in pixels (>= 0), got {self.degrade_blur}")
        if not 0.0 <= self.degrade_saturation <= 1.0:
            raise ValueError(
                "vae.degrade_saturation is the largest fraction of the chroma taken away, in [0, 1] (0: colours kept),"
                f" got {self.degrade_saturation}"
            )


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Training clips and their text embeddings.

    ``path``: a dataset built by ``show1_jax.data.build_dataset`` (its folder or one above it). Or ``source``: a
    caption CSV (or a folder holding ``captions.csv``) that is built first into ``build_dir`` (default
    ``<workdir>/data``) with clips of ``frames`` x ``height`` x ``width`` at ``fps``; a video that is missing, cannot
    be decoded or is too short stops the build naming its file, unless ``skip_bad`` is true: then it is left out and
    listed (path and reason) in the log and in ``<workdir>/skipped_videos.json``. An existing build is reused.

    Text: embeddings stored in the dataset are used as they are. Otherwise captions are looked up in
    ``embeddings`` (a table written by ``save_caption_embeddings``) or encoded with ``text_encoder`` (a T5 or CLIP
    ``text_encoder/`` folder, cached under ``<workdir>/text_cache``). The empty prompt (``empty_prompt``, used for
    classifier-free-guidance dropout) comes from the same place: give the table a ``""`` entry.

    ``batch_size`` is the global batch (all devices and hosts together); each host reads its share.
    ``batch_group_size`` g > 1 keeps each run of g consecutive CSV rows together in one batch (the shuffle permutes
    whole runs; ``BatchIterator``'s ``group_size``): contrastive batches such as the shapes recipe's direction
    quadruples. The per-host batch must be a multiple of g and the row count too.
    """

    path: str | None = None
    source: str | None = None
    build_dir: str | None = None
    skip_bad: bool = False
    frames: int = 8
    height: int = 40
    width: int = 64
    fps: float | None = None
    video_column: str = "video_path"
    caption_column: str = "caption"
    num_workers: int = 2
    embeddings: str | None = None
    text_encoder: str | None = None
    empty_prompt: str = ""
    batch_size: int = 8
    batch_group_size: int = 1
    seed: int = 0

    def __post_init__(self):
        if (self.path is None) == (self.source is None):
            raise ValueError(
                "set exactly one of data.path (a built dataset) or data.source (a caption CSV to build from)"
            )
        if self.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        if self.batch_group_size < 1 or self.batch_size % self.batch_group_size:
            raise ValueError(
                f"data.batch_group_size {self.batch_group_size} must be >= 1 and divide data.batch_size"
                f" {self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warmup then a constant or cosine learning rate, global-norm clipping and optional EMA.

    ``trainable``: ``all`` parameters, ``temporal`` layers only (``temp_convs``, ``temp_attentions``,
    ``transformer_in``), ``temporal_attention`` only (``temp_attentions``: motion customization, SPEC.md §9) or,
    for the autoencoder, its ``decoder`` only (``decoder`` and ``post_quant_conv``: the latent space, and so a
    latent UNet trained in it, stays valid).
    Frozen parameters get no gradient, no optimizer state and no EMA copy.
    ``decay_steps``: the step the cosine reaches ``end_learning_rate``; default (null) the run's ``steps``. Set it
    to stop a run part-way along a longer schedule (a recipe run reproducing one exported mid-run).
    """

    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    end_learning_rate: float = 0.0
    decay_steps: int | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float | None = 1.0
    ema_decay: float | None = None
    trainable: str = "all"

    def __post_init__(self):
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule `{self.schedule}`: choose one of {LR_SCHEDULES}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"optim.trainable `{self.trainable}`: choose one of {TRAINABLE}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.decay_steps ({self.decay_steps}) must exceed optim.warmup_steps ({self.warmup_steps}), or be"
                " null (the run's steps)"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Orbax checkpoints under ``<workdir>/checkpoints``: every ``every`` steps and at the end, the last ``keep``
    kept, written in the background when ``async_save``. A run restarted with the same workdir resumes from the
    latest one (parameters, optimizer state, EMA, step, data position and PRNG state)."""

    every: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training run of one model of the cascade: a stage's UNet (``keyframes``, ``interpolation``,
    ``first_frame`` = IF-II-L, ``sr1``, ``sr2``) or SR2's autoencoder (``vae``).

    ``mesh``: ``data=..,fsdp=..,tensor=..`` sizes (``show1_jax.sharding.MeshConfig``; -1 = the remaining devices);
    parameters above ``sharding_threshold`` elements are split by the rules of ``show1_jax.sharding``.
    ``export_ema``: with EMA on, the exported UNet holds the EMA parameters.
    """

    stage: str = "keyframes"
    workdir: str = "runs/keyframes"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    mesh: str = "data=1,fsdp=-1"
    sharding_threshold: int | None = None
    export_ema: bool = True
    model: ModelSettings = ModelSettings(config="tiny_base")
    diffusion: DiffusionSettings = DiffusionSettings()
    first_frame: FirstFrameSettings = FirstFrameSettings()
    sr1: SR1Settings = SR1Settings()
    vae: VAESettings = VAESettings()
    data: DataSettings = DataSettings(path="data")
    optim: OptimSettings = OptimSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage `{self.stage}`: choose one of {STAGES}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if self.stage in ("first_frame", "vae") and self.diffusion.num_frames is not None:
            raise ValueError(
                f"stage {self.stage} trains on single frames (one random frame of each clip): set"
                " diffusion.num_frames=null"
            )
        if self.stage == "vae" and self.model.vae is not None:
            raise ValueError(
                "model.vae is SR2's frozen VAE; to train a VAE (stage vae) set model.pretrained (a vae/ folder) or"
                " model.config (tiny_vae or an AutoencoderKL config.json) and leave model.vae null"
            )
