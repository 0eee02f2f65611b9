"""A finished run's model cards (model_card, pure) and their upload to the Hugging Face Hub (hub)."""
