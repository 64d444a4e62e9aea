"""Builders of test and demo fixtures: tiny random LLaVA-Llama-3 checkpoints and their tokenizers."""
