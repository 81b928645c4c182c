"""Plumbing shared by the harness, the trainer and the launchers: atomic writes, digests, devices, task options,
plausible value ranges, cache paths and image decoding. Each module imports only what it needs (no torch outside
``devices``), so importing one stays cheap."""
