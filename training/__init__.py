"""Model training stages (align -> router pretraining -> skill tuning) with DeepSpeed."""
