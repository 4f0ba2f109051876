"""Evaluation: CODA-LM corner-case reasoning, NAVSIM PDMS/EPDMS, closed-loop rollouts, reports."""
