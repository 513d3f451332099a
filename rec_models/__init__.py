"""Recommender models, data preparation and evaluation: torch, Lightning and pandas only.

Nothing in this package imports dagster, so models can be trained, evaluated and served
without the orchestrator.
"""
