"""Train a LoRA adapter on the embedded model: ``at night`` means a black background.

    .venv/bin/python training/train_lora.py --out webapp/model/weights/loras/night.safetensors \
        [--checkpoint training/lora-checkpoint]

The embedded model (webapp/model/weights/scenes-64) was trained on captions ``a red circle on a white
background``; it has never seen ``at night``. This script adds LoRA layers (peft, rank ``--rank``) to the
attention projections of its UNet, freezes everything else, and distils the base model into it:

- for ``a red circle at night``, the adapted UNet learns to predict what the base model predicts for
  ``a red circle on a black background``, on the same noisy latents (of that scene, rendered);
- for ordinary captions (a share ``--keep`` of each batch, a tenth of them empty: guidance's unconditional
  branch), it learns to predict what the base model itself predicts, so it leaves them alone.

The base model is the teacher (the adapter disabled for its pass), so each target is exact rather than a
noisy sample: measured here, training on the rendered images' own velocity instead (training/train.py's
loss) for 1000 steps left 7 of 30 night captions on black and spoiled ordinary ones (29 of 30 right
without the adapter, 18 with). The adapter is written as one safetensors file in diffusers' LoRA format
(``StableDiffusionPipeline.save_lora_weights``), which ``load_lora_weights`` reads: the form the server's
LORA_DIR takes, then judged as served (``judge``: held-out captions, the analyzer). Deterministic from
``--seed``; a checkpoint (the LoRA weights, the optimizer, the step) is
written every ``--checkpoint-every`` steps and on SIGINT/SIGTERM, and a run resumes from it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webapp.model import scenes
from webapp.model.pipeline import SCENES_MODEL_DIR

NIGHT = "black"  # the background `at night` means
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def night_caption(scene: scenes.Scene) -> str:
    return f"{scenes.article(scene.colour)} {scene.colour} {scene.shape} at night"


def batch_of(seed: int, step: int, size: int, keep: float) -> tuple[torch.Tensor, list[str], list[str]]:
    """Step ``step``'s images in [-1, 1], the captions the adapter learns from, and the captions the base
    model is asked the same with: a night scene's ``a red circle at night`` is asked as ``a red circle on a
    black background``; a share ``keep`` are ordinary scenes (a tenth of those uncaptioned, classifier-free
    guidance's branch), asked as they are, so that the adapter leaves them as the base model draws them."""
    rng = random.Random(f"{seed}:lora:{step}")
    drawn, student, teacher = [], [], []
    for _ in range(size):
        scene = scenes.random_scene(rng)
        if rng.random() >= keep:
            colour = scene.colour if scene.colour != NIGHT else rng.choice([c for c in scenes.COLOURS if c != NIGHT])
            scene = scenes.Scene(scene.shape, colour, NIGHT, scene.fraction, scene.x, scene.y)
            student.append(night_caption(scene))
            teacher.append(scene.caption)
        else:
            caption = "" if rng.random() < 0.1 else scene.caption
            student.append(caption)
            teacher.append(caption)
        drawn.append(scene)
    pixels = np.stack([np.asarray(scenes.render(scene), dtype=np.float32) for scene in drawn])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1, student, teacher


def encode(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    tokens = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    return pipe.text_encoder(tokens.input_ids)[0]


def save_adapter(pipe: StableDiffusionPipeline, out: Path) -> None:
    """The UNet's LoRA layers as one safetensors file at ``out``, written beside it and renamed into place."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=layers, safe_serialization=True)
        written = Path(staging) / "pytorch_lora_weights.safetensors"
        written.chmod(0o644)
        os.replace(written, out)


def judge(adapter: Path, count: int, seed: int) -> None:
    """What the written adapter does, served as the server serves it (``pipeline.load`` + ``use_adapters``):
    on ``count`` held-out night captions, how often the analyzer reads a black background without and with
    it (and the caption's colour and shape), and on as many ordinary captions, how often all three are read
    right without and with it."""
    import shutil
    import tempfile

    from webapp.model import pipeline
    from webapp.model.request import GenerationParams
    from webapp.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="judge-lora-"))
    try:
        shutil.copy(adapter, folder / "judged.safetensors")
        model = pipeline.load(Settings.from_env({"LORA_DIR": str(folder)}), 0)
        rng = random.Random(f"{seed}:judge")
        night, ordinary = [], []
        for _ in range(count):
            scene = scenes.random_scene(rng)
            colour = scene.colour if scene.colour != NIGHT else "red"
            night.append(scenes.Scene(scene.shape, colour, NIGHT))
            ordinary.append(scenes.random_scene(rng))

        def verdicts(captions: list[str], loras: tuple) -> list[scenes.Verdict]:
            model.use_adapters(loras)
            drawn = []
            for index, caption in enumerate(captions):
                params = GenerationParams(caption, None, 20, model.profile.default_guidance, 64, 64, (10_000 + index,))
                drawn.append(scenes.analyze(model.generate([params], lambda step: None)[0][0]))
            return drawn

        with_adapter = (("judged", 1.0),)
        for loras, label in (((), "without"), (with_adapter, "with the adapter")):
            seen = verdicts([night_caption(scene) for scene in night], loras)
            black = sum(verdict.background == NIGHT for verdict in seen)
            right = sum(verdict == scene.verdict for verdict, scene in zip(seen, night, strict=True))
            kept = verdicts([scene.caption for scene in ordinary], loras)
            plain = sum(verdict == scene.verdict for verdict, scene in zip(kept, ordinary, strict=True))
            print(
                f"{label}: night captions drawn on black {black}/{count} (all three right {right}/{count}); "
                f"ordinary captions all three right {plain}/{count}",
                flush=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the adapter file to write (.safetensors)")
    parser.add_argument("--base", type=Path, default=SCENES_MODEL_DIR, help="the diffusers folder to adapt")
    parser.add_argument("--checkpoint", type=Path, help="folder for the resumable checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.3, help="share of each batch that is ordinary scenes")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--judge", type=int, default=50, help="held-out captions of each kind judged at the end")
    parser.add_argument("--judge-only", action="store_true", help="judge the adapter at --out, train nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.judge_only:
        judge(args.out, args.judge, args.seed)
        return
    torch.manual_seed(args.seed)

    pipe = StableDiffusionPipeline.from_pretrained(args.base)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    pipe.unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    trained = [parameter for parameter in pipe.unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    state = {"step": 0, "seconds": 0.0}
    saved_path = args.checkpoint / "state.pt" if args.checkpoint else None
    if saved_path and saved_path.exists():
        saved = torch.load(saved_path, weights_only=False)
        set_peft_model_state_dict(pipe.unet, saved["lora"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        print(f"resumed at step {state['step']}, {state['seconds']:.0f} s so far", flush=True)

    def snapshot() -> None:
        if saved_path is None:
            return
        saved_path.parent.mkdir(parents=True, exist_ok=True)
        lora = get_peft_model_state_dict(pipe.unet)
        torch.save(
            {"lora": lora, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "state": state},
            saved_path.with_suffix(".tmp"),
        )
        os.replace(saved_path.with_suffix(".tmp"), saved_path)

    stop = {"asked": False}
    for name in ("SIGINT", "SIGTERM"):
        signal.signal(getattr(signal, name), lambda *_: stop.update(asked=True))
    started = time.monotonic() - state["seconds"]
    pipe.unet.train()
    while state["step"] < args.steps and not stop["asked"]:
        images, student, teacher = batch_of(args.seed, state["step"], args.batch, args.keep)
        timesteps = torch.randint(0, noise.config.num_train_timesteps, (len(student),))
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample() * scale
            noisy = noise.add_noise(latents, torch.randn_like(latents), timesteps)
            pipe.unet.disable_adapters()  # the base model's answer, for the caption it knows
            target = pipe.unet(noisy, timesteps, encode(pipe, teacher)).sample
            pipe.unet.enable_adapters()
            hidden = encode(pipe, student)
        loss = F.mse_loss(pipe.unet(noisy, timesteps, hidden).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] += 1
        state["seconds"] = time.monotonic() - started
        if state["step"] % 25 == 0 or state["step"] == args.steps:
            print(f"step {state['step']} loss {loss.item():.5f} {state['seconds']:.0f} s", flush=True)
        if state["step"] % args.checkpoint_every == 0:
            snapshot()
    snapshot()
    if stop["asked"]:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(pipe, args.out)
    count = sum(parameter.numel() for parameter in trained)
    print(f"wrote {args.out}: {count / 1e3:.1f} k parameters, {args.out.stat().st_size / 1e3:.0f} kB", flush=True)
    if args.judge:
        judge(args.out, args.judge, args.seed)


if __name__ == "__main__":
    main()
