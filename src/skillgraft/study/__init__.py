"""Studies on SkillBench: merge (normalized accuracy, interference, λ sweeps), compress (retained skill vs
pack budget) and transfer (gap closed by logit arithmetic). Each writes one results JSON for ``report``."""
