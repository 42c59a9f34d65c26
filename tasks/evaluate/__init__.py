"""evaluate: eval-set readers, scoring, retrieval metrics, the stage, and the Hugging Face export."""
