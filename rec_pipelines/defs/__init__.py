"""Dagster definitions, one folder per domain; loaded by ``rec_pipelines.definitions``."""
