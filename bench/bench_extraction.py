"""Feature-extraction throughput for rad-dino at 518 px on the CPU: our pipeline against the reference library's
own per-image loop, on the same images and the same (random) weights.

    python bench/bench_extraction.py [--images 4] [--batch-size 4] [--threads 2]

A randomly initialised ViT-B/14 (RAD-DINO's architecture, transformers Dinov2Model) is saved as a Hugging Face
folder in a temporary directory together with RAD-DINO's ``preprocessor_config.json``; nothing is downloaded.
- ours:      ``baselines.preprocess.preprocess_batch`` + ``encoder.encode`` (the registered rad-dino loader), in
             batches of --batch-size, from [1, H, W] float images in [0, 1];
- reference: for each image, ``AutoImageProcessor`` (BitImageProcessor, from that JSON) on the 8-bit image, then
             ``Dinov2Model`` on the result, one image at a time (the usage the model card shows).
Both start from the same 8-bit grey radiograph-like images of mixed sizes and portrait/landscape orientation. The
features are compared before the ratio is printed (cosine similarity of the global embeddings and of the patch
grids; the two resize implementations differ slightly: Pillow bicubic on 8-bit RGB vs antialiased torch bicubic on
float). Timed: everything from the in-memory image to the features; one warm-up image for each pipeline first.
Ratio = reference seconds / our seconds (> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines.rad_dino as rad_dino
from baselines.preprocess import preprocess_batch
from baselines.registry import build_encoder

# microsoft/rad-dino's preprocessor_config.json (BitImageProcessor).
RAD_DINO_PROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 518}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 518, "width": 518}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5307] * 3, "image_std": [0.2583] * 3,
    "do_convert_rgb": True,
}
SIZES = [(640, 520), (520, 600), (700, 560), (560, 560), (610, 540), (530, 660), (600, 600), (560, 690)]


def radiographs(n: int) -> list[np.ndarray]:
    """Smooth 8-bit grey images with structure at several scales (so resampling differences show)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = 0.5 + 0.3 * np.sin(6 * xx + i) * np.cos(4 * yy) + 0.1 * rng.standard_normal((h, w))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def save_random_rad_dino(folder: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518, patch_size=14)
    Dinov2Model(cfg).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(RAD_DINO_PROCESSOR))


def ours(encoder, images: list[np.ndarray], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    globals_, patches = [], []
    for i in range(0, len(images), batch_size):
        batch = [torch.from_numpy(a).float().div_(255.0)[None] for a in images[i:i + batch_size]]
        feats = encoder.encode(preprocess_batch(batch, encoder.preprocess))
        globals_.append(feats.global_)
        patches.append(feats.patch)
    return torch.cat(globals_), torch.cat(patches)


def reference(processor, model, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    globals_, patches = [], []
    with torch.inference_mode():
        for a in images:
            inputs = processor(images=Image.fromarray(a), return_tensors="pt")
            out = model(**inputs)
            tokens = out.last_hidden_state[:, 1:]
            globals_.append(out.pooler_output)
            patches.append(tokens.transpose(1, 2).reshape(1, -1, 37, 37))
    return torch.cat(globals_), torch.cat(patches)


def timed(fn, *args) -> tuple[float, tuple]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images per pipeline (ViT-B at 518 px is slow on a CPU)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.images < 1 or args.batch_size < 1:
        ap.error("--images and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)

    from transformers import AutoImageProcessor, Dinov2Model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rad-dino"
        save_random_rad_dino(folder)
        encoder = build_encoder("rad-dino", weights_dir=Path(tmp))
        processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval()
        assert encoder.preprocess == rad_dino.NATIVE
        images = radiographs(args.images + 1)
        warm, images = images[:1], images[1:]
        ours(encoder, warm, 1)
        reference(processor, model, warm)

        t_ref, (g_ref, p_ref) = timed(reference, processor, model, images)
        t_ours, (g_ours, p_ours) = timed(ours, encoder, images, args.batch_size)

    cos_g = torch.nn.functional.cosine_similarity(g_ours, g_ref, dim=1)
    cos_p = torch.nn.functional.cosine_similarity(p_ours.flatten(1), p_ref.flatten(1), dim=1)
    print(f"processor: {type(processor).__name__}; images: {len(images)} (sizes {[a.shape for a in images]}); "
          f"threads: {args.threads}; batch: {args.batch_size}")
    print(f"agreement: global cosine min {cos_g.min():.6f}, patch-grid cosine min {cos_p.min():.6f}, "
          f"global max |diff| {(g_ours - g_ref).abs().max():.4g} (feature scale {g_ref.abs().max():.3g})")
    if cos_g.min() < 0.999 or cos_p.min() < 0.99:
        raise SystemExit("features disagree: the comparison below would not be like for like")
    n = len(images)
    print(f"reference (BitImageProcessor + Dinov2Model, per image): {t_ref:.2f} s, {n / t_ref:.3f} images/s")
    print(f"ours (preprocess_batch + encode, batches of {args.batch_size}): {t_ours:.2f} s, {n / t_ours:.3f} images/s")
    print(f"ratio reference/ours: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
