"""The annotation stages: spaCy phrases, OWLv2 boxes, VQA generation (backends, prompt and parser)."""
