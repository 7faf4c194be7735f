"""Strategies: HOW to diffuse. STRATEGIES maps a --strategy name to its class; register your own here."""
from medgen.Generation.TrainGen.core.strategies.base import DiffusionStrategy, Strategy
from medgen.Generation.TrainGen.core.strategies.ddpm import DDPMStrategy
from medgen.Generation.TrainGen.core.strategies.rflow import RFlowStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "ddpm": DDPMStrategy,
    "rflow": RFlowStrategy,
}

__all__ = ["STRATEGIES", "DiffusionStrategy", "Strategy"]
