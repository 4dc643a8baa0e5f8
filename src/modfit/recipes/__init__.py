"""Recipes: whole pipelines from files (`modfit recipe ...`)."""

from __future__ import annotations

from .cross_lingual import CrossLingualReport, CrossLingualSpec, run_cross_lingual

__all__ = ["CrossLingualReport", "CrossLingualSpec", "run_cross_lingual"]
