"""Fine-tunes on disk (the SAGE layout), LoRA training in a child process, and the demo models."""
