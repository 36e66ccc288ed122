"""Shared infrastructure: what every layer may use (user errors, the Ray cluster, the fork server,
file fingerprints). It imports nothing from `data`, `trainables`, `search` or `captune`
(tests/test_layers.py holds it to that)."""
