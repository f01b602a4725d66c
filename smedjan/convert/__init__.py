"""Other formats into Hugging Face folders: llama2.c checkpoints, GGUF files (`smedjan convert ...`)."""
