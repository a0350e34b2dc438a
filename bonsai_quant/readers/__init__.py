"""Readers for what users already hold: BFL single-file checkpoints and the published Bonsai packs."""
