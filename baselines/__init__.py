"""Encoders under test. Each family registers itself on import; add one line here per new file."""
from baselines.registry import Encoder, Features, WeightsMissing, build_encoder, register_encoder  # noqa: F401 (API)

from baselines import floors  # noqa: F401 (registers pixels, random-vit)
from baselines import rad_dino, dinov2, clip, biomedclip, biovil_t, mrm  # noqa: F401 (registers the pretrained)
from baselines import ckpt  # noqa: F401 (registers ckpt:DIR, our own training runs)
