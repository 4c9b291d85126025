"""Judging and scoring answers: the judge, reward scores, generation and decoding, held-out comparisons, reports."""
