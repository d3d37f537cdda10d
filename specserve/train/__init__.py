"""Drafter training: corpus, tokenizer, target LM, target-generated data, MTP/DFlash/DSpark
drafters, STS calibration and offline evaluation; `bundle` rebuilds the demo models."""
