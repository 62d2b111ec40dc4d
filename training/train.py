"""Train the embedded model on generated scenes (webapp/model/scenes.py) and write a standard diffusers folder.

    .venv/bin/python training/train.py --out models/scenes-64 [--checkpoint training/checkpoint]

The same kinds of components the server loads, built by webapp/model/tiny_model.py to this script's ``RECIPE``:
an AutoencoderKL, a CLIP text encoder with the byte-level tokenizer, a UNet2DConditionModel and a DDIM
scheduler, all for 64x64 images.
Two phases, in order:
1. the VAE, ``--vae-steps`` steps; the UNet starts only if the analyzer then reads at least
   ``--vae-target`` of held-out whole reconstructions right (a VAE that smears shapes caps everything after
   it). It trains on 32x32 windows of the scenes first: measured here, 200 steps of 32 windows (125 s on
   one core) reached the loss and analyzer figures of 300 steps of 16 whole images (358 s). Windows alone
   leave a frame of another tone along a whole image's border (its padding was never an image's edge), so
   the last steps (from ``--vae-crop-steps``) train on whole images;
2. the UNet and the text encoder together, the VAE frozen, v-prediction, captions dropped 10 % of the
   time so classifier-free guidance has an unconditional branch to push against.

Deterministic from ``--seed``: the batch of step k is drawn from a generator seeded with (seed, phase, k),
so a resumed run sees the batches an uninterrupted one would. A checkpoint (models, optimizers, torch's
RNG state, phase and step) is written every ``--checkpoint-every`` steps, at the end of each phase and on
SIGINT/SIGTERM, atomically; a run started with an existing checkpoint resumes from it. Losses, the
analyzer's figures and the time go to stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webapp.model import scenes, tiny_model

CAPTION_DROPOUT = 0.1
WARMUP_STEPS = 100


# 64x64 images; the VAE divides each side by 4 (16x16x4 latents), and both UNet levels attend to the text.
# 3.17 M parameters (the random-weight model has 1.68 M). Measured on 2 cores: a VAE step of 16 whole images
# 0.73 s with these channels (3.0 s for 32 images at (32, 64, 64)), a UNet step of 32 images 1.5-1.7 s.
RECIPE = tiny_model.Recipe(
    text_hidden=64,
    text_intermediate=128,
    unet_sample_size=16,
    unet_channels=(48, 96),
    unet_down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    unet_groups=16,
    vae_channels=(16, 32, 64),
    vae_groups=16,
    prediction_type="v_prediction",
)


def batch_of(seed: int, phase: str, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Step ``step``'s batch of ``phase``: images in [-1, 1] and their captions."""
    rng = random.Random(f"{seed}:{phase}:{step}")
    drawn = [scenes.random_scene(rng) for _ in range(size)]
    pixels = np.stack([np.asarray(scenes.render(scene), dtype=np.float32) for scene in drawn])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1
    return images, [scene.caption for scene in drawn]


def crops(images: torch.Tensor, seed: int, step: int, side: int) -> torch.Tensor:
    """A ``side`` x ``side`` window of each image, placed by a generator seeded with (seed, step). The VAE is
    convolutional, so it learns edges and colours from windows at a quarter of the cost of whole images."""
    if side >= images.shape[-1]:
        return images
    rng = random.Random(f"{seed}:crop:{step}")
    room = images.shape[-1] - side
    windows = []
    for image in images:
        x, y = rng.randint(0, room), rng.randint(0, room)
        windows.append(image[:, y : y + side, x : x + side])
    return torch.stack(windows)


def learning_rate(base: float, step: int, total: int) -> float:
    """Linear warm-up over WARMUP_STEPS, then a cosine down to a tenth of ``base`` at ``total``: a
    function of the step alone, so a resumed run sets the rate an uninterrupted one would."""
    if step < WARMUP_STEPS:
        return base * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_image(tensor: torch.Tensor) -> object:
    from PIL import Image

    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def vae_accuracy(vae: AutoencoderKL, seed: int, count: int) -> float:
    """The share of held-out scenes whose reconstruction the analyzer reads right."""
    images, captions = batch_of(seed, "vae-eval", 0, count)
    with torch.no_grad():
        reconstructed = vae.decode(vae.encode(images).latent_dist.mode()).sample
    right = sum(scenes.analyze(to_image(r)) == scenes.parse(c) for r, c in zip(reconstructed, captions, strict=True))
    return right / count


def write_pipeline(parts: dict, scale: float, out: Path) -> None:
    """The pipeline as a diffusers folder (safetensors), written beside ``out`` and renamed into place."""
    import shutil

    parts["vae"].register_to_config(scaling_factor=scale)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    tiny_model.assemble(parts, RECIPE).save_pretrained(staging, safe_serialization=True)
    card = out / "README.md"  # the model card is written by hand; keep it
    if card.is_file():
        shutil.copy2(card, staging / card.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)


class Checkpoint:
    def __init__(self, folder: Path | None) -> None:
        self.path = folder / "state.pt" if folder else None

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        return torch.load(self.path, weights_only=False)

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        torch.save(state, staging)
        os.replace(staging, self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    parser.add_argument("--checkpoint", type=Path, help="folder for the resumable checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="images per UNet step")
    parser.add_argument("--vae-batch", type=int, default=32, help="images per VAE step")
    parser.add_argument("--vae-steps", type=int, default=2000, help="VAE steps, the learning rate's schedule")
    parser.add_argument(
        "--vae-target", type=float, default=0.95, help="analyzer accuracy the VAE must reach before the UNet starts"
    )
    parser.add_argument("--vae-eval-every", type=int, default=100)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--vae-crop", type=int, default=32, help="side of the windows the VAE trains on first")
    parser.add_argument("--vae-crop-steps", type=int, default=1500, help="VAE steps on windows; then whole images")
    parser.add_argument("--vae-whole-batch", type=int, default=16, help="whole images per later VAE step")
    parser.add_argument("--unet-steps", type=int, default=2000, help="UNet steps, the learning rate's schedule")
    parser.add_argument("--unet-lr", type=float, default=5e-4, help="the UNet and text encoder's peak learning rate")
    parser.add_argument("--stop-at", type=int, help="end the UNet phase at this step of that schedule")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--preview-every", type=int, default=400, help="write the diffusers folder this often")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--init-from",
        type=Path,
        help="a diffusers folder this script wrote: start from its weights (VAE and scaling factor kept), UNet phase",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    parts = tiny_model.build_components(RECIPE, args.seed)
    vae, text_encoder, unet, tokenizer = parts["vae"], parts["text_encoder"], parts["unet"], parts["tokenizer"]
    vae_lr, unet_lr = args.vae_lr, args.unet_lr
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=vae_lr)
    unet_optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=unet_lr)
    noise = DDPMScheduler(num_train_timesteps=1000, prediction_type=RECIPE.prediction_type, **tiny_model.SCHEDULE)
    state = {"phase": "vae", "step": 0, "scaling_factor": None, "seconds": 0.0}
    checkpoint = Checkpoint(args.checkpoint)
    if args.init_from:
        for name in ("vae", "text_encoder", "unet"):
            parts[name].load_state_dict(type(parts[name]).from_pretrained(args.init_from / name).state_dict())
        scale = AutoencoderKL.load_config(args.init_from / "vae")["scaling_factor"]
        state = {"phase": "unet", "step": 0, "scaling_factor": scale, "seconds": 0.0}
        print(f"starting from {args.init_from}: the UNet phase, latent scaling factor {scale:.4f}", flush=True)
    saved = checkpoint.load()
    if saved:
        for name, module in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
            module.load_state_dict(saved[name])
        vae_optimizer.load_state_dict(saved["vae_optimizer"])
        unet_optimizer.load_state_dict(saved["unet_optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        print(f"resumed: phase {state['phase']}, step {state['step']}, {state['seconds']:.0f} s so far", flush=True)

    def snapshot() -> None:
        checkpoint.save(
            {
                "vae": vae.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "unet": unet.state_dict(),
                "vae_optimizer": vae_optimizer.state_dict(),
                "unet_optimizer": unet_optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "state": state,
            }
        )

    stop = {"asked": False}
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), lambda *_: stop.update(asked=True))
    started = time.monotonic() - state["seconds"]

    def clock() -> float:
        state["seconds"] = time.monotonic() - started
        return state["seconds"]

    if state["phase"] == "vae":
        vae.train()
        while state["step"] < args.vae_steps and not stop["asked"]:
            if state["step"] < args.vae_crop_steps:
                images, _ = batch_of(args.seed, "vae", state["step"], args.vae_batch)
                images = crops(images, args.seed, state["step"], args.vae_crop)
            else:
                images, _ = batch_of(args.seed, "vae", state["step"], args.vae_whole_batch)
            for group in vae_optimizer.param_groups:
                group["lr"] = learning_rate(vae_lr, state["step"], args.vae_steps)
            posterior = vae.encode(images).latent_dist
            reconstructed = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(reconstructed, images) + 1e-6 * posterior.kl().mean()
            vae_optimizer.zero_grad()
            loss.backward()
            vae_optimizer.step()
            state["step"] += 1
            done = state["step"] % args.vae_eval_every == 0 or state["step"] == args.vae_steps
            if done:
                vae.eval()
                accuracy = vae_accuracy(vae, args.seed, 64)
                vae.train()
                print(
                    f"vae step {state['step']} loss {loss.item():.5f} analyzer {accuracy:.1%} {clock():.0f} s",
                    flush=True,
                )
            if state["step"] % args.checkpoint_every == 0:
                snapshot()
        if stop["asked"]:
            snapshot()
            return
        vae.eval()
        accuracy = vae_accuracy(vae, args.seed, 256)
        print(f"vae: the analyzer reads {accuracy:.1%} of 256 held-out reconstructions right", flush=True)
        if accuracy < args.vae_target:
            sys.exit(
                f"the VAE is below --vae-target {args.vae_target:.0%}: the UNet would learn its smears; "
                "train it longer (--vae-steps)"
            )
        with torch.no_grad():
            images, _ = batch_of(args.seed, "scale", 0, 64)
            state["scaling_factor"] = float(1 / vae.encode(images).latent_dist.mode().std())
        print(f"vae done: {state['step']} steps, latent scaling factor {state['scaling_factor']:.4f}, {clock():.0f} s")
        state["phase"], state["step"] = "unet", 0
        snapshot()

    vae.requires_grad_(False)
    vae.eval()
    scale = state["scaling_factor"]
    unet.train()
    text_encoder.train()
    last = min(args.unet_steps, args.stop_at or args.unet_steps)
    while state["step"] < last and not stop["asked"]:
        images, captions = batch_of(args.seed, "unet", state["step"], args.batch)
        for group in unet_optimizer.param_groups:
            group["lr"] = learning_rate(unet_lr, state["step"], args.unet_steps)
        rng = random.Random(f"{args.seed}:dropout:{state['step']}")
        captions = ["" if rng.random() < CAPTION_DROPOUT else caption for caption in captions]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * scale
        tokens = tokenizer(captions, padding="max_length", max_length=tiny_model.MAX_TOKENS, return_tensors="pt")
        hidden = text_encoder(tokens.input_ids)[0]
        timesteps = torch.randint(0, noise.config.num_train_timesteps, (len(captions),))
        eps = torch.randn_like(latents)
        noisy = noise.add_noise(latents, eps, timesteps)
        target = noise.get_velocity(latents, eps, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, hidden).sample, target)
        unet_optimizer.zero_grad()
        loss.backward()
        unet_optimizer.step()
        state["step"] += 1
        if state["step"] % args.eval_every == 0 or state["step"] == last:
            print(f"unet step {state['step']} loss {loss.item():.5f} {clock():.0f} s", flush=True)
        if state["step"] % args.checkpoint_every == 0:
            snapshot()
        if state["step"] % args.preview_every == 0 and state["step"] < last:
            write_pipeline(parts, scale, args.out)
            print(f"preview written to {args.out} at unet step {state['step']}", flush=True)
    snapshot()
    if stop["asked"]:
        return

    write_pipeline(parts, scale, args.out)
    count = sum(p.numel() for module in (vae, text_encoder, unet) for p in module.parameters())
    print(f"wrote {args.out}: {count / 1e6:.2f} M parameters, {clock():.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
