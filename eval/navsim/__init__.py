"""Standalone NAVSIM PDMS (v1) / EPDMS (v2) scorer.

    from eval.navsim import score_scenes, mean_score
    rows = score_scenes(scenes, {token: poses_8x3}, metric="epdms", tracking=True, human_filter=True)

Modules (one idea each): config (every constant), simulate (0.1 s interpolation + LQR on a kinematic
bicycle), geometry (vectorised boxes / polylines / polygons), observation (agents and red lights at 10 Hz),
context (a scene's trajectory-independent data), metrics (NC, DAC, DDC, TLC, EP, TTC, LK), comfort (C, HC, EC),
aggregate (EP normalisation, PDMS/EPDMS, human filter), pdm_closed (reference planner), scorer (the API),
predictions (file I/O), agents (reference agents), fixtures (hand-built road scenes), cli (`mose eval navsim`).
"""
from eval.navsim.scorer import ReferenceCache, average_row, mean_score, score_scenes

__all__ = ["ReferenceCache", "average_row", "mean_score", "score_scenes"]
