"""Generation: sampling responses and scoring them against ground-truth answers."""
