"""``popularity``: the region's own popularity list -- every item scored by how often the target's
training histories (of the sampled users, with ``train_fraction``) hold it. No model, no training; the
floor every other method's metrics.json and log are compared against: a model below its region's
popularity list has learned less about the region than counting does."""
from __future__ import annotations

from .base import Method


class Popularity(Method):
    name = "popularity"
    summary = "the target's own popularity list (training interactions per item); no model"
    output = "none"
    trains = False
    starts_from_base = False
    role = "popularity"
