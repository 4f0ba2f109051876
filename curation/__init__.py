"""Data curation: which scenes and skills enter each training stage."""
