"""Small Stable Diffusion pipelines built from real diffusers classes: the builder of both embedded models.

``build_components`` makes fresh components to a ``Recipe`` of dimensions; training/train.py grows the
default model (builtin:scenes-64, shipped in webapp/models) from them. With the default recipe and seed
they are ``builtin:tiny-sd``: built once, deterministically, into a cache folder and then loaded with
``from_pretrained`` exactly like a real model. Its weights are random, its images noise: the floor
bench/quality.py compares against, and the model the loading tests break copies of.
Importing this module imports torch, diffusers and transformers; only the engine thread does that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Bump when the recipe below changes, so an old cached build is never loaded by new code.
RECIPE_VERSION = 1
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77


def _byte_vocabulary() -> dict[str, int]:
    """The 256 byte-level characters, the same with ``</w>``, then BOS and EOS: 514 tokens.

    Byte-level BPE shows each byte as one printable character: printable Latin-1 bytes stand for
    themselves and the rest are shifted past 255, so every byte has a visible, distinct symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=_byte_vocabulary(),
        merges=[],
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=MAX_TOKENS,
    )


@dataclass(frozen=True)
class Recipe:
    """The dimensions of a small Stable Diffusion pipeline. The defaults are the embedded random-weight
    model's; training/train.py passes its own."""

    text_hidden: int = 32
    text_intermediate: int = 37
    unet_sample_size: int = 32
    unet_channels: tuple[int, ...] = (32, 64)
    unet_down: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_groups: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    vae_groups: int = 32
    prediction_type: str = "epsilon"


SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def build_components(recipe: Recipe = Recipe(), seed: int = 0) -> dict[str, Any]:
    """Fresh tokenizer, text encoder, UNet and VAE of ``recipe``; the same seed gives the same weights."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.text_hidden,
            intermediate_size=recipe.text_intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=recipe.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=recipe.unet_sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=recipe.unet_channels,
        down_block_types=recipe.unet_down,
        up_block_types=recipe.unet_up,
        cross_attention_dim=recipe.text_hidden,
        attention_head_dim=8,
        norm_num_groups=recipe.unet_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
        latent_channels=4,
        norm_num_groups=recipe.vae_groups,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}


def assemble(parts: dict[str, Any], recipe: Recipe = Recipe()) -> StableDiffusionPipeline:
    """The pipeline of ``parts`` with the DDIM scheduler every build of this recipe serves with."""
    scheduler = DDIMScheduler(
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=recipe.prediction_type, **SCHEDULE
    )
    return StableDiffusionPipeline(
        **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Return a fresh tiny pipeline (~1.7 M parameters, 64x64 images); the same seed gives the same weights."""
    return assemble(build_components(Recipe(), seed))


def ensure_built(cache_dir: str | os.PathLike[str]) -> Path:
    """Build the tiny pipeline into ``cache_dir`` unless a complete build is there; return its folder.

    Safe when several workers race: each builds into its own temporary folder and renames it into place
    (atomic on one filesystem); the loser of the race discards its copy.
    """
    target = Path(cache_dir) / f"tiny-sd-v{RECIPE_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_pipeline().save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- tiny pipelines of the other families the server serves (random weights, for tests and the GPU bench's
# harness check): the same real classes as SDXL, SD3 and FLUX, at a few hundred thousand parameters.

FAMILY_BUILDS = ("sdxl", "sd3", "flux")


def _t5_parts(hidden: int) -> tuple[Any, Any]:
    """A T5 tokenizer over printable ASCII (a Unigram vocabulary, no hub) and a small T5 encoder."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocabulary = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocabulary += [(chr(code), -1.0) for code in range(32, 127)] + [("\u2581", -1.0)]
    tokenizer = T5TokenizerFast(vocab=vocabulary, extra_ids=0)
    config = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return tokenizer, T5EncoderModel(config)


def _clip_encoder(hidden: int, projection: bool) -> Any:
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _small_vae(shift_factor: float | None = None) -> AutoencoderKL:
    """A VAE of scale factor 2 (two blocks), 4 latent channels."""
    return AutoencoderKL(
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        shift_factor=shift_factor,
        scaling_factor=0.3611 if shift_factor is not None else 0.18215,
    )


def _tiny_sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # the second encoder's projection (32) + 6 time ids x 8
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=_small_vae(),
        text_encoder=_clip_encoder(32, projection=False),
        text_encoder_2=_clip_encoder(32, projection=True),
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading", steps_offset=1),
    )


def _tiny_sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer_3, text_encoder_3 = _t5_parts(32)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections side by side
        pos_embed_max_size=32,  # latent sides up to 64: images up to 128 px
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=_small_vae(shift_factor=0.0609),
        text_encoder=_clip_encoder(32, projection=True),
        text_encoder_2=_clip_encoder(32, projection=True),
        text_encoder_3=text_encoder_3,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _tiny_flux() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer_2, text_encoder_2 = _t5_parts(32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        transformer=transformer,
        vae=_small_vae(shift_factor=0.1159),
        text_encoder=_clip_encoder(32, projection=False),
        tokenizer=build_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


_FAMILY_BUILDERS = {"sdxl": _tiny_sdxl, "sd3": _tiny_sd3, "flux": _tiny_flux}


def build_family(family: str, seed: int = 0) -> Any:
    """A tiny random-weight pipeline of ``family`` (sdxl, sd3 or flux); the same seed gives the same weights.
    Native sizes: sdxl 64x64 (multiple 8), sd3 64x64 (multiple 4, at most 128), flux 256x256 (multiple 4)."""
    if family not in _FAMILY_BUILDERS:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILY_BUILDS)})")
    torch.manual_seed(seed)
    return _FAMILY_BUILDERS[family]()
