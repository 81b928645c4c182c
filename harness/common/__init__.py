"""Plumbing shared by the harness, the trainer and the launchers: the one error path of every command (errors),
atomic writes, digests, devices, task options, plausible value ranges, cache paths and image decoding. Each module imports only what it needs (no torch outside
``devices``), so importing one stays cheap."""
