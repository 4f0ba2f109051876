"""Standalone NAVSIM PDMS (v1) / EPDMS (v2) scorer."""
