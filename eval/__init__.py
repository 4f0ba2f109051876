"""Evaluation: CODA-LM corner-case reasoning, NAVSIM PDMS/EPDMS, closed-loop rollouts, a VLM checkpoint as a planner."""
