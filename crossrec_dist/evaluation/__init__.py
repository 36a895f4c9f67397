"""Full-ranking evaluation: every item in the vocabulary is a candidate; no sampled negatives."""
