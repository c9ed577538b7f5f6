"""The feature spec's identity, without torch: trace manifests and head checkpoints record it, and their readers
(:mod:`speccascade.data.traces` among them) refuse files of another spec before computing anything."""

SPEC_NAME = "speccascade-features"
SPEC_VERSION = 2  # v2 added js, the collision sums and the cross-argmax probabilities
