"""Routing and serving among skills: one base in memory, the right skill (or mix) per request.

``SkillRuntime`` runs LoRA-form skills unmerged, batched across rows that use different skills, and hot-swaps
dense ones; routers (``route.routers``) choose a skill per prompt; ``route.serve`` is the HTTP server.
"""
