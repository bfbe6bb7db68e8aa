"""Training: loss and splits (eqs 10-11), the eq-16 schedule, the Adam loop with checkpoints."""
