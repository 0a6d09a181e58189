"""Skill packs: the file format, per-tensor encodings, extraction, application and base fingerprints."""

from skillgraft.skill.pack import BaseIdentity, Manifest, PackWriter, SkillPack

__all__ = ["BaseIdentity", "Manifest", "PackWriter", "SkillPack"]
