"""Training the embedded tiny model: drawn scenes, their questions, and the recipe (needs torch)."""
