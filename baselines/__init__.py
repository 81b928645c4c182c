"""Encoders under test. Each family is a module of this package, listed by one line of the table in
`baselines.registry` and imported only when that encoder is built or its weights are looked up."""
from baselines.registry import ENCODERS, Encoder, Features, WeightsMissing, build_encoder  # noqa: F401
