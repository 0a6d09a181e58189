"""SkillBench: seeded string skills, a character-level tokenizer, and tiny Llama bases and experts that
``build`` trains on CPU in minutes and caches — the models skillgraft's methods are measured on.
"""

from skillgraft.bench.build import FULL, PROFILES, QUICK, BenchManifest, Profile, build, default_cache
from skillgraft.bench.skills import SKILLS, Skill, composition_examples, examples
from skillgraft.bench.train import ModelSize, Stage, exact_match

__all__ = [
    "FULL",
    "PROFILES",
    "QUICK",
    "SKILLS",
    "BenchManifest",
    "ModelSize",
    "Profile",
    "Skill",
    "Stage",
    "build",
    "composition_examples",
    "default_cache",
    "exact_match",
    "examples",
]
