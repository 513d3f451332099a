"""A seeded feedback simulator, the project's built-in dataset: catalog, users with drifting
tastes, sessions of feedback, written as landing-zone batches (docs/simulator.md)."""

from rec_models.simulator.core import FeedbackSimulator
from rec_models.simulator.parameters import SimulatorConfig
from rec_models.simulator.vocabulary import CATEGORIES, CATEGORY_NAMES, TAG_VOCABULARY, Category
from rec_models.simulator.writing import next_batch_index

__all__ = ["CATEGORIES", "CATEGORY_NAMES", "TAG_VOCABULARY", "Category", "FeedbackSimulator", "SimulatorConfig",
           "next_batch_index"]
