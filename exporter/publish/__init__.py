"""Publishing verified exports to the Hugging Face Hub, with a generated model card."""
